"""Training curves of one fold as a PNG: loss, validation Dice per patient, learning rate."""
from __future__ import annotations

from pathlib import Path

from pipeline.core import runs
from pipeline.core.figures import new_figure, save_png


def plot_curves(rows: list[dict], patients: list[str], path: str | Path, title: str = "") -> Path:
    """rows: metrics.csv rows (epoch, train_loss, val_loss, val_dice_mean, val_dice_<p>, lr)."""
    epochs = [r["epoch"] for r in rows]
    val = [r for r in rows if r.get("val_dice_mean") is not None]
    fig = new_figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_dice, ax_lr = fig.subplots(1, 3)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train", color="tab:blue")
    ax_loss.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="validation",
                 color="tab:orange")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend(frameon=False)
    for p in patients:
        ax_dice.plot([r["epoch"] for r in val], [r.get(f"val_dice_{p}") for r in val], lw=0.8, alpha=0.6, label=p)
    ax_dice.plot([r["epoch"] for r in val], [r["val_dice_mean"] for r in val], "k-", lw=2, label="mean")
    if val:
        best = runs.best_row(val)
        ax_dice.axvline(best["epoch"], color="grey", ls=":", lw=1)
        ax_dice.text(0.02, 0.97, f"best mean {best['val_dice_mean']:.3f} @ epoch {int(best['epoch'])}",
                     transform=ax_dice.transAxes, va="top", fontsize=8)
    ax_dice.set(xlabel="epoch", ylabel="3D liver Dice", title="Validation Dice per patient", ylim=(0, 1))
    ax_dice.legend(frameon=False, fontsize=7, ncol=2, loc="lower right")
    ax_lr.plot(epochs, [r["lr"] for r in rows], color="tab:green")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="Learning rate (end of epoch)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in (ax_loss, ax_dice, ax_lr):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=150)
