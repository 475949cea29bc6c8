"""A run's results as a markdown table, a JSON file and one PNG plot. Pure up to the file writes.

A result ("point") is one system x workload x concurrency: `summarize()`'s numbers plus those three
keys. The ratios section is where the issue's targets are read off: Bowline over sequential
`generate()` at the same workload (the sequential baseline has no concurrency), over the static batch
and over vLLM at the same concurrency.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import cpu_info

# The engine goal: at concurrency 16, 4x sequential generate()'s output tokens/s.
TARGET_CONCURRENCY = 16
TARGET_RATIO = 4.0

SYSTEM_ORDER = ["hf-seq", "hf-batch", "vllm", "bowline", "bowline-core", "bowline-kv16"]
BOWLINE_SYSTEMS = ["bowline", "bowline-core", "bowline-kv16"]


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:.0f}" if v >= 0.1 else f"{v * 1000:.1f}"


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


WORKLOAD_ORDER = ["short", "mixed"]


def _rank(order: list[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def _sort_key(p: dict) -> tuple:
    return (_rank(WORKLOAD_ORDER, p["workload"]), _rank(SYSTEM_ORDER, p["system"]), p["concurrency"])


def markdown_table(points: list[dict]) -> str:
    """One row per point: throughput, TTFT, TPOT and end-to-end latency; times in ms (e2e in s)."""
    head = ("| system | workload | conc | requests | errors | out tok/s | TTFT mean ms | TTFT p50 | TTFT p99 "
            "| TPOT mean ms | TPOT p50 | TPOT p99 | e2e mean s | e2e p99 s |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in sorted(points, key=_sort_key):
        rows.append(
            f"| {p['system']} | {p['workload']} | {p['concurrency']} | {p['requests']} | {p['errors']} "
            f"| {p['output_tokens_per_s']:.1f} | {_ms(p['ttft_mean_s'])} | {_ms(p['ttft_p50_s'])} | {_ms(p['ttft_p99_s'])} "
            f"| {_ms(p['tpot_mean_s'])} | {_ms(p['tpot_p50_s'])} | {_ms(p['tpot_p99_s'])} "
            f"| {_s(p['e2e_mean_s'])} | {_s(p['e2e_p99_s'])} |"
        )
    return "\n".join(rows)


def _find(points: list[dict], system: str, workload: str, concurrency: int | None = None) -> dict | None:
    for p in points:
        if p["system"] == system and p["workload"] == workload and (concurrency is None or p["concurrency"] == concurrency):
            return p
    return None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or a["errors"] or b["errors"] or not b["output_tokens_per_s"]:
        return None
    return a["output_tokens_per_s"] / b["output_tokens_per_s"]


def ratios(points: list[dict]) -> list[dict]:
    """Bowline's output tokens/s over each baseline's, per workload and concurrency (None where missing);
    one row per Bowline system (the engine in a thread of the server, `bowline`, or in its own process)."""
    out = []
    for p in sorted((p for p in points if p["system"] in BOWLINE_SYSTEMS),
                    key=lambda p: (_sort_key(p), BOWLINE_SYSTEMS.index(p["system"]))):
        w, c = p["workload"], p["concurrency"]
        out.append({
            "system": p["system"],
            "workload": w,
            "concurrency": c,
            "bowline_tok_s": p["output_tokens_per_s"],
            "vs_hf_seq": _ratio(p, _find(points, "hf-seq", w)),
            "vs_hf_batch": _ratio(p, _find(points, "hf-batch", w, c)),
            "vs_vllm": _ratio(p, _find(points, "vllm", w, c)),
        })
    return out


def ratios_table(rows: list[dict]) -> str:
    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}x"

    lines = ["| system | workload | conc | bowline tok/s | / hf-seq | / hf-batch | / vllm |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['workload']} | {r['concurrency']} | {r['bowline_tok_s']:.1f} | {x(r['vs_hf_seq'])} "
                     f"| {x(r['vs_hf_batch'])} | {x(r['vs_vllm'])} |")
    return "\n".join(lines)


def target_verdict(rows: list[dict]) -> str | None:
    """The 4x-over-generate() check on the short workload, or None when the run did not measure it."""
    for r in rows:
        if (r["system"] == "bowline" and r["workload"] == "short" and r["concurrency"] == TARGET_CONCURRENCY
                and r["vs_hf_seq"] is not None):
            ok = r["vs_hf_seq"] >= TARGET_RATIO
            return (f"Target (short, c={TARGET_CONCURRENCY}, >= {TARGET_RATIO:.0f}x sequential generate()): "
                    f"{r['vs_hf_seq']:.2f}x -> {'MET' if ok else 'NOT MET'}")
    return None


def render_markdown(meta: dict, points: list[dict], notes: list[str]) -> str:
    """The whole report: setup line, results table, ratios, the target line and any notes (skips, errors)."""
    rows = ratios(points)
    parts = [
        f"## Bench run {meta['run_id']}",
        "",
        f"Model `{meta['model']}` ({meta['model_preset']} preset, {meta['dtype']}, {meta['device']}, "
        f"{meta['cpu_count']} CPU cores); "
        f"{meta['requests']} requests per point; git {meta['git']}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        *([cpu_info.header_line(meta["cpu"])] if meta.get("cpu") else []),
        "",
        markdown_table(points),
    ]
    if rows:
        parts += ["", "Output tokens/s ratios (Bowline over each baseline):", "", ratios_table(rows)]
    verdict = target_verdict(rows)
    if verdict:
        parts += ["", verdict]
    if notes:
        parts += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"


def write_json(path: Path, meta: dict, points: list[dict], notes: list[str]) -> None:
    path.write_text(json.dumps({"meta": meta, "notes": notes, "ratios": ratios(points), "points": points}, indent=1))


def write_plot(path: Path, points: list[dict]) -> bool:
    """Tokens/s and mean TTFT against concurrency, one line per system and workload. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"bowline": "tab:blue", "bowline-core": "tab:purple", "bowline-kv16": "tab:cyan", "vllm": "tab:orange", "hf-batch": "tab:green", "hf-seq": "tab:gray"}
    styles = {"short": "-", "mixed": "--"}
    concs = sorted({p["concurrency"] for p in points})
    for system in SYSTEM_ORDER:
        for workload in sorted({p["workload"] for p in points}, key=lambda w: _rank(WORKLOAD_ORDER, w)):
            pts = sorted((p for p in points if p["system"] == system and p["workload"] == workload),
                         key=lambda p: p["concurrency"])
            if not pts:
                continue
            label = f"{system} ({workload})"
            style = dict(color=colors.get(system), linestyle=styles.get(workload, ":"), marker="o")
            xs = [p["concurrency"] for p in pts]
            if system == "hf-seq":
                # One request at a time has no concurrency: draw its rate as the level to beat.
                ax_tps.axhline(pts[0]["output_tokens_per_s"], color=colors[system], linestyle=styles.get(workload, ":"),
                               label=label)
            else:
                ax_tps.plot(xs, [p["output_tokens_per_s"] for p in pts], label=label, **style)
            ttft = [(p["concurrency"], p["ttft_mean_s"]) for p in pts if p["ttft_mean_s"] is not None]
            if ttft:
                ax_ttft.plot([c for c, _ in ttft], [t * 1000 for _, t in ttft], label=label, **style)
    for ax, title, ylabel in ((ax_tps, "Output tokens/s", "tokens/s"), (ax_ttft, "Mean TTFT", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_ttft.set_yscale("log")
    ax_ttft.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_ttft.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_ttft.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_tps.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
