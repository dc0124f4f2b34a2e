"""The experiment as a job graph: its keys (:mod:`.config`), the plan (:mod:`.plan`), what each job
needs (:mod:`.resources`), the data pre-flight, the executors (:mod:`.local`, :mod:`.slurm`) that
run every job as its own process through one worker (:mod:`.worker`), the state each job leaves in
its directory (:mod:`.state`), the driver and ``status`` (:mod:`.driver`), and the report."""

from .config import PipelineConfig, classify_sets, eval_sets, recipe_overrides, rehearsal_config, stage_data
from .driver import JobsFailed, PipelineStopped, pipeline_status, run_pipeline
from .dryrun import dry_run
from .plan import Job, build_job_config, plan_jobs, run_job
from .preflight import DataCheck, pre_flight
from .state import set_aside_if_stale

__all__ = [
    "DataCheck", "Job", "JobsFailed", "PipelineConfig", "PipelineStopped", "build_job_config", "classify_sets",
    "dry_run", "eval_sets",
    "pipeline_status", "plan_jobs", "pre_flight", "recipe_overrides", "rehearsal_config", "run_job",
    "run_pipeline", "set_aside_if_stale", "stage_data",
]
