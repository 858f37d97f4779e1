"""Evaluation: how good a checkpoint is, by likelihood, by sampling, and on the synthetic testbed.

- `likelihood`: Monte Carlo ELBO and chain-rule likelihoods as pure functions of (model, ids, settings)
- `harness`, `run`, `presets`, `lm_eval_cli`, `task_data`: lm-evaluation-harness tasks (the `sinkdlm`
  model class, `sinkdlm eval`, per-task settings, lm-eval's own CLI, the offline task data)
- `gsm8k`: GSM8K accuracy by diffusion sampling (`sinkdlm eval-gsm8k`)
- `generation`, `generation_plots`: quality of generated text under a judge LM (`sinkdlm eval-generation`)
- `probes`: copy accuracy and attention probes of the synthetic copy task (`sinkdlm probe`)
"""
