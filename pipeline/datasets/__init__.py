"""Data sets: the CHAOS layout, MSD / nnU-Net, image-label pairs, patient splits, prepare, the synthetic generator."""
