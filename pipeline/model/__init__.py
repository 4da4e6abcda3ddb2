"""The network and what surrounds it: networks, transforms, slice-wise prediction, post-processing."""
