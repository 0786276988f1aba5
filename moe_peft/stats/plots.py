"""PNG plots of RoutingStats (matplotlib, Agg backend: no display needed).

* expert_load.png: heatmap layers x experts, each expert's share of the routing in that layer;
* routing_by_<group>.png: one heatmap per layer, groups (tasks, sample types) x experts;
* experts_per_token.png: mean number of experts per token in each layer, overall and per group.
"""

from __future__ import annotations

import os

import torch

MAX_PANELS = 12  # layers shown in routing_by_<group>.png (evenly spaced when there are more)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def short_name(layer: str) -> str:
    """model.layers.3.mlp.gate_proj -> L3.mlp.gate_proj (the prefix every layer shares adds nothing)."""
    parts = layer.replace("base_model.model.", "").split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return ".".join([f"L{parts[i + 1]}"] + parts[i + 2 :])
    return layer


def _expert_labels(stats, count: int) -> list[str]:
    names = stats.expert_names
    return list(names) if names is not None and len(names) == count else [str(e) for e in range(count)]


def _annotate(ax, matrix: torch.Tensor) -> None:
    if matrix.shape[0] * matrix.shape[1] > 160:
        return
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = float(matrix[i, j])
            if value == value:  # not NaN
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )


def plot_expert_load(stats, path: str) -> str:
    plt = _pyplot()
    layers, load = stats.load_matrix()  # [L, E]
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * load.shape[1], 1.2 + 0.32 * len(layers)))
    image = ax.imshow(
        load.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(load.nan_to_num().max()))
    )
    _annotate(ax, load)
    ax.set_yticks(range(len(layers)), [short_name(n) for n in layers], fontsize=7)
    ax.set_xticks(range(load.shape[1]), _expert_labels(stats, load.shape[1]), fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title("expert load per layer (share of the routing)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_routing_by_group(stats, path: str) -> str:
    plt = _pyplot()
    layers = stats.layers
    if len(layers) > MAX_PANELS:  # evenly spaced layers, first and last included
        picks = sorted({round(i * (len(layers) - 1) / (MAX_PANELS - 1)) for i in range(MAX_PANELS)})
        layers = [layers[i] for i in picks]
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    width = max(stats.totals[n].counts.shape[1] for n in layers)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(1.0 + cols * (1.0 + 0.4 * width), 0.6 + rows * (0.9 + 0.3 * len(stats.groups))),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, name in zip(axes.flat, layers):
        matrix = stats.group_matrix(name)  # [G, E]
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        _annotate(ax, matrix)
        ax.set_title(short_name(name), fontsize=8)
        ax.set_yticks(range(len(stats.groups)), stats.groups, fontsize=7)
        ax.set_xticks(range(matrix.shape[1]), _expert_labels(stats, matrix.shape[1]), fontsize=6)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    shown = "" if len(layers) == len(stats.layers) else f" ({len(layers)} of {len(stats.layers)} layers)"
    fig.suptitle(f"routing by {stats.by}: share of each {stats.by}'s routing per expert{shown}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
    return _save(plt, fig, path)


def plot_experts_per_token(stats, path: str) -> str:
    plt = _pyplot()
    layers = stats.layers
    overall = [stats.layer(n)["experts_per_token"] or 0.0 for n in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 1.5), 3.2))
    x = torch.arange(len(layers)).numpy()
    ax.bar(x, overall, color="lightgray", label="all")
    if stats.by is not None and len(stats.groups) > 1:
        spread = 0.6 / len(stats.groups)  # each group's markers a little apart, inside the layer's bar
        for g, group in enumerate(stats.groups):
            values = [stats.layer(n, group)["experts_per_token"] or 0.0 for n in layers]
            ax.plot(x - 0.3 + spread * (g + 0.5), values, marker="o", linestyle="none", markersize=4, label=group)
    ax.set_xticks(x, [short_name(n) for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("experts per token")
    ax.set_title("mean number of experts per token", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_all(stats, out_dir: str) -> dict[str, str]:
    paths = {"expert_load": plot_expert_load(stats, os.path.join(out_dir, "expert_load.png"))}
    if stats.by is not None:
        paths[f"routing_by_{stats.by}"] = plot_routing_by_group(
            stats, os.path.join(out_dir, f"routing_by_{stats.by}.png")
        )
    paths["experts_per_token"] = plot_experts_per_token(stats, os.path.join(out_dir, "experts_per_token.png"))
    return paths
