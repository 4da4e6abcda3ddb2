"""Metrics (Dice, HD95, ASSD, CHAOS scores) and the evaluation of masks against references."""
