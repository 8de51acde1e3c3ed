"""Where a run keeps everything: chapter names and every artifact path, written down once.

A run directory holds ``profile.yaml`` and ``manifest.json`` (the runner's), ``notebooks/`` (the executed
chapters), ``book_src/`` and ``book/`` (the HTML book), ``models/`` (models built or fetched for the run),
``cache/`` (verdict and evaluation caches shared by chapters) and ``artifacts/<chapter>/`` (what each
chapter writes). Chapters read what earlier chapters wrote, so a path
spelled two ways is a file that one chapter writes and another never finds; every reader and writer asks
``RunLayout`` instead. ``Run`` is "the run" that library functions take: the profile and its layout.

Words: a *chapter* is a notebook of the book (``04_sft``); a *stage* is a training stage (``sft``,
``reward_model``, ``grpo``, ``ppo``); a *step* is one of rule extraction's explain/extract/merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Profile

# ---------------------------------------------------------------- chapters (the notebooks' names)

OVERVIEW = "00_overview"
DATA = "01_data_preparation"
RULES = "02_rule_extraction"
AGREEMENT = "03_rule_agreement"
SFT = "04_sft"
RM = "05_reward_model"
GRPO = "06_grpo"  # GRPO runs and PPO
EVALUATION = "07_evaluation"
HACKING = "08_reward_hacking"
RESULTS = "09_results"
CHAPTERS = (OVERVIEW, DATA, RULES, AGREEMENT, SFT, RM, GRPO, EVALUATION, HACKING, RESULTS)
METRIC_CHAPTERS = (EVALUATION, HACKING)  # the chapters whose metrics.json feeds the results table


def chapter_names(only: list[str] | None = None, names=CHAPTERS) -> list[str]:
    """The chapters ``only`` selects, in book order; an item may be a number ('02'), a full name, or a name
    without its number. The runner and the SLURM planner select with this one rule."""
    if not only:
        return list(names)
    chosen = []
    for item in only:
        match = [n for n in names if item in (n[:2], n, n[3:])]
        if not match:
            raise ValueError(f"--only {item!r}: no such chapter (have {list(names)})")
        chosen.extend(m for m in match if m not in chosen)
    return sorted(chosen)

# the data chapter's two sources: profile/CLI name -> its folder under the data chapter
DATA_SOURCES = {"ultrafeedback": "ultrafeedback", "uf": "ultrafeedback", "mt_bench": "mt_bench", "mt": "mt_bench"}


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory. Nothing is created here: writers make their folders when they write
    (``chapter_out`` is the exception: a chapter's own folder exists once the chapter opens)."""

    run_dir: Path

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    # ------------------------------------------------------------ the runner's files
    @property
    def profile_file(self) -> Path:
        """The frozen profile every chapter and training process of the run reads."""
        return self.run_dir / "profile.yaml"

    @property
    def manifest(self) -> Path:
        return self.run_dir / "manifest.json"

    def executed_notebook(self, chapter: str) -> Path:
        """The chapter's notebook as the runner executed it (with outputs); the book is built from these."""
        return self.run_dir / "notebooks" / f"{chapter}.ipynb"

    @property
    def book_src(self) -> Path:
        """The jupyter-book source assembled from the executed notebooks."""
        return self.run_dir / "book_src"

    @property
    def book(self) -> Path:
        """jupyter-book's output folder (the HTML under ``_build/html``)."""
        return self.run_dir / "book"

    @property
    def slurm(self) -> Path:
        """``autorule slurm``'s job scripts and logs, unless it is given another folder."""
        return self.run_dir / "slurm"

    @property
    def models(self) -> Path:
        """Models built or fetched for this run (the smoke profile's tiny models live here)."""
        return self.run_dir / "models"

    def cache(self, name: str) -> Path:
        """A cache shared by chapters: ``verdicts`` (rule verifier, chapters 03/06/08/09), ``evaluation``
        (responses and judgments, chapters 07/08). The name ``ResponseCache`` takes: its entries live in the
        ``<name>.shards/`` folder beside it (``cache.py``)."""
        return self.run_dir / "cache" / f"{name}.sqlite"

    @property
    def verdict_cache(self) -> Path:
        return self.cache("verdicts")

    @property
    def evaluation_cache(self) -> Path:
        return self.cache("evaluation")

    # ------------------------------------------------------------ chapters
    def chapter(self, name: str) -> Path:
        """A chapter's artifact folder (it may not exist yet)."""
        return self.run_dir / "artifacts" / name

    def chapter_out(self, name: str) -> Path:
        """A chapter's own artifact folder, created: where the chapter writes."""
        d = self.chapter(name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def metrics(self, chapter: str) -> Path:
        """The metric rows a chapter reports (``results.metric_row``)."""
        return self.chapter(chapter) / "metrics.json"

    # 01: prepared data
    def data(self, source: str) -> Path:
        """One prepared source (``ultrafeedback``/``uf`` or ``mt_bench``/``mt``): report, provenance, sets."""
        if source not in DATA_SOURCES:
            raise ValueError(f"unknown data source {source!r} (have {sorted(DATA_SOURCES)})")
        return self.chapter(DATA) / DATA_SOURCES[source]

    def data_sets(self, source: str) -> Path:
        """The prepared splits of one source (a ``datasets`` DatasetDict on disk)."""
        return self.data(source) / "sets"

    # 02: rule sets
    def rules_dir(self, rule_set: str) -> Path:
        """Rule extraction's folder for one rule set (``uf`` or ``mt``): records, reports, the merged rules."""
        return self.chapter(RULES) / rule_set

    def rules(self, rule_set: str) -> Path:
        """The merged rule set: a JSON array of rule strings."""
        return self.rules_dir(rule_set) / "merged_rules.json"

    # 04/05: SFT and reward model
    @property
    def sft_dir(self) -> Path:
        return self.chapter(SFT)

    @property
    def sft_model(self) -> Path:
        return self.sft_dir / "model"

    @property
    def rm_dir(self) -> Path:
        return self.chapter(RM)

    @property
    def rm_model(self) -> Path:
        return self.rm_dir / "model"

    @property
    def rm_normalization(self) -> Path:
        """The RM's frozen mu/sigma (computed once on the filtered test pairs)."""
        return self.rm_dir / "rm_normalization.json"

    # 06: GRPO runs and PPO (PPO's folder sits beside the GRPO runs, named "ppo")
    def grpo_dir(self, run: str) -> Path:
        """One RL run's folder: checkpoints, ``log_history.json``, ``done.json`` and ``final``."""
        return self.chapter(GRPO) / run

    def grpo_final(self, run: str) -> Path:
        return self.grpo_dir(run) / "final"

    @property
    def ppo_dir(self) -> Path:
        return self.grpo_dir("ppo")

    @property
    def ppo_final(self) -> Path:
        return self.grpo_final("ppo")

    # 07: evaluation outputs other chapters read
    def responses(self, method: str) -> Path:
        """A method's UF test responses, written by the evaluation chapter (the results chapter rereads them)."""
        return self.chapter(EVALUATION) / "responses" / f"{method}.jsonl"


@dataclass
class Run:
    """The run a library function works on: the profile it runs under and where its files are."""

    profile: Profile
    layout: RunLayout

    @classmethod
    def at(cls, profile: Profile, run_dir: str | Path) -> Run:
        return cls(profile, RunLayout(Path(run_dir)))

    @property
    def run_dir(self) -> Path:
        return self.layout.run_dir
