"""Every stage function and the run they share, in one namespace (for scripts and tests). The stages live one
module each in dna/stages/, the run in dna/context.py, dna/spaces/context.py and dna/run.py; code that should not
depend on every stage imports those."""
from dna.checkpoint import write_csv, write_json  # noqa: F401
from dna.checks import check_arch_teacher, check_teacher, validate  # noqa: F401
from dna.context import EVAL_BATCH_SIZE, EpochHook  # noqa: F401
from dna.cost_tables import latency_model, stage_tables  # noqa: F401
from dna.run import Run  # noqa: F401
from dna.stages.data import stage_data  # noqa: F401
from dna.stages.distill import (  # noqa: F401
    distill_resumes_after,
    distilled,
    stage_distill,
    stage_features,
    trained_supernet,
)
from dna.stages.export import stage_export  # noqa: F401
from dna.stages.latency_profile import stage_profile  # noqa: F401
from dna.stages.rate import stage_rate  # noqa: F401
from dna.stages.retrain import build_student, init_from_supernet, stage_retrain  # noqa: F401
from dna.stages.search import choice_of, predicted_scores, predictor_of, rating_summary, stage_search  # noqa: F401
from dna.stages.teacher import HISTORY_COLUMNS, stage_teacher  # noqa: F401
