"""The built-in naming policies: ``default`` (SPEC section 18) and ``seed`` (section 4).

The default puts what tells siblings apart first, because MLflow's run list shows about
18 characters of a name: the folds of a trial (``t05 fold1 …``), the trials of a sweep
(``t05_1 …``), the sweeps of an experiment (``sweep_2 350a79aa …``), and the final,
benchmark and conversion runs of one model (``final …``, ``bench_1 …``, ``conv …``). The
model and the remaining hashes follow; the environment and the full hashes are tags.

The seed's table is the naming of the training repo this SDK comes from, kept byte for
byte for teams whose dashboards and searches rely on it.
"""

from __future__ import annotations

DEFAULT_KINDS: dict[str, dict[str, str]] = {
    "hpo_sweep": {
        "pattern": "sweep{version} {study_hash}{semantic_suffix} {model}",
    },
    "hpo_trial": {
        "pattern": "t{trial_number}{version} {model} study-{study_hash}",
    },
    "hpo_trial_fold": {
        "pattern": "t{trial_number} fold{fold_idx} {model} study-{study_hash}",
    },
    "hpo_refit": {
        "pattern": "refit t{trial_number}{version} {model} study-{study_hash} trial-{trial_hash}",
    },
    "final_training": {
        "pattern": "final {spec_hash} v{variant} {model} exec-{exec_hash}",
        "fallback": "final {run_id} {model}",
    },
    "benchmarking": {
        "pattern": "bench{version} {bench_hash} {model} study-{study_hash} trial-{trial_hash}",
    },
    "conversion": {
        "pattern": "conv {conv_hash} {spec_hash} v{variant} {model} exec-{exec_hash}",
    },
}

SEED_KINDS: dict[str, dict[str, str]] = {
    "hpo_sweep": {
        "pattern": "{env}_{model}_hpo_study-{study_hash}{semantic_suffix}{version}",
    },
    "hpo_trial": {
        "pattern": "{env}_{model}_hpo_trial_study-{study_hash}_t{trial_number}{version}",
    },
    "hpo_trial_fold": {
        "pattern": "{env}_{model}_hpo_trial_study-{study_hash}_t{trial_number}_fold{fold_idx}",
    },
    "hpo_refit": {
        "pattern": (
            "{env}_{model}_hpo_refit_study-{study_hash}_trial-{trial_hash}_t{trial_number}{version}"
        ),
    },
    "final_training": {
        "pattern": "{env}_{model}_final_training_spec-{spec_hash}_exec-{exec_hash}_v{variant}",
        "fallback": "{env}_{model}_training_{run_id}",
    },
    "benchmarking": {
        "pattern": (
            "{env}_{model}_benchmark_study-{study_hash}_trial-{trial_hash}"
            "_bench-{bench_hash}{version}"
        ),
    },
    "conversion": {
        "pattern": (
            "{env}_{model}_conversion_spec-{spec_hash}_exec-{exec_hash}_v{variant}_conv-{conv_hash}"
        ),
    },
}

# The names TRAINKIT_NAMING_POLICY and a policy file's ``extends`` accept.
PRESETS: dict[str, dict[str, dict[str, str]]] = {"default": DEFAULT_KINDS, "seed": SEED_KINDS}
