"""Attention-sink analysis: record a model's attention (record), measure it (stats; its tied ranks in
ranks, its movement measures in movement; null models in nulls), intervene
(interventions), follow it over training (training), plot and report (plots, report).

The pipeline that ties them together for one checkpoint lives in `pipeline`; its entry points are
re-exported here.
"""

from sinkdlm.analysis.pipeline import AnalysisConfig, analyze_checkpoint, moving_sink_summary, run_analysis

__all__ = ["AnalysisConfig", "analyze_checkpoint", "moving_sink_summary", "run_analysis"]
