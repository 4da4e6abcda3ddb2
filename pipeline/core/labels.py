"""What the label values mean: one definition for every stage.

Prepared label maps (prepare's labelsTr) hold the CHAOS organs; every mask this project writes
(infer's NIfTI, the model's output channel) holds the liver at `LIVER`.
"""
from __future__ import annotations

LIVER = 1  # the liver in prepared label maps, in written masks and as the model's output channel
ORGANS = {0: "background", LIVER: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
MODEL_OUTPUT = {0: "background", LIVER: "liver"}  # channels of the network's logits (without model.organs)
LIVER_RGB = (221, 130, 101)  # the colour 3D Slicer's GenericAnatomyColors gives the liver


def model_output(organs: bool) -> dict[int, str]:
    """The network's output channels: MODEL_OUTPUT, or every organ of ORGANS with model.organs."""
    return dict(ORGANS) if organs else dict(MODEL_OUTPUT)
