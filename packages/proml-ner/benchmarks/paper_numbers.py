"""ProML's reported micro F1 per setting beside ours, for the benchmark report and the README.

Paper: Chen, Zheng, Yang, "Prompt-Based Metric Learning for Few-Shot NER", Findings of ACL 2023
(arXiv:2211.04337). The figures must come from the paper's own tables. The stored copies of the paper
that could be searched while writing this file held its abstract and introduction but not its result
tables, so every figure below is ``None`` ("not found"): nothing is guessed. Fill a figure in only from
the paper's text, with the table it came from.

A third-party leaderboard (wizwand.com, paper 68fa6dd81e209131cea3c608) lists ProML results without the
shot setting: Onto-A 52.46, Onto-B 69.69, Onto-C 67.58, I2B2 58.21, GUM 36.99, Few-NERD (arXiv v6)
"1-shot INTRA" 56.49. They are not verified against the paper and not placed in the table.
"""

from __future__ import annotations

import benchkit

# setting -> (bundled config, extra --set overrides, paper micro F1 or None = not found)
SETTINGS: list[tuple[str, str, str, float | None]] = [
    *[
        (f"Few-NERD {m.upper()} {n}-way {s}-shot", f"fewnerd-{m}-{n}way-{c}shot", "", None)
        for m in ("intra", "inter")
        for n in (5, 10)
        for s, c in (("1~2", "1-2"), ("5~10", "5-10"))
    ],
    *[
        (f"OntoNotes tag extension {g} {k}-shot", f"ontonotes-tag-extension-{g.lower()}", o, None)
        for g in "ABC"
        for k, o in ((1, ""), (5, "--set episodes.k_shot=5 --set train.episodes_per_step=1"))
    ],
    *[
        (f"domain transfer -> {t} {k}-shot", f"domain-transfer-{c}", o, None)
        for t, c in (("CoNLL-03", "conll"), ("WNUT-17", "wnut"), ("I2B2-14", "i2b2"), ("GUM", "gum"))
        for k, o in ((1, ""), (5, "--set episodes.k_shot=5 --set train.episodes_per_step=1"))
    ],
]


def paper_table(accuracy: benchkit.Section, synthetic: bool) -> benchkit.Section:
    """One row per paper setting: the paper's figure (or "not found") and ours (or why there is none)."""
    rows = []
    for setting, config, overrides, paper in SETTINGS:
        ours = "not run: no data on this machine" if synthetic else "run the config on your data"
        paper_cell = f"{paper:.2f}" if paper is not None else "not found"
        rows.append([setting, paper_cell, ours, f"proml-ner train {config} {overrides}".strip()])
    proml = next((r for r in accuracy.rows if r[0] == "proml"), None)
    if synthetic and proml is not None:
        rows.append(
            [
                "SYNTHETIC 5-way 5~10-shot (ours only, not comparable)",
                "n/a",
                f"{100 * float(proml[1]):.2f}",
                "benchmarks/run.py (accuracy section)",
            ]
        )
    sec = benchkit.Section(
        title="ProML's reported micro F1 (%) beside ours",
        description="Paper: Chen et al., Findings of ACL 2023. 'not found': the paper's result tables were "
        "not in the searchable copies; no figure is guessed. Ours: no Few-NERD / OntoNotes / target-domain "
        "data exist offline here, so only the synthetic row is measured.",
        columns=["setting", "paper F1", "ours F1", "command"],
        rows=rows,
    )
    sec.notes.append(
        "Third-party leaderboard figures without shot settings (unverified, not in the table): Onto-A 52.46, "
        "Onto-B 69.69, Onto-C 67.58, I2B2 58.21, GUM 36.99, Few-NERD arXiv-v6 '1-shot INTRA' 56.49."
    )
    return sec
