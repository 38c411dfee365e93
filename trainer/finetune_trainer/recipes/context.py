"""StageContext: everything a recipe needs, with storage, distribution and reporting already decided.

A recipe builds its trainer from `ctx.causal_lm()`, `ctx.data(...)`, `ctx.training_args(...)` and `ctx.callbacks()`,
resumes with `ctx.resume_checkpoint()` and ends with `ctx.save_final(...)`. The same recipe code runs in one plain
process and in every Ray Train worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import set_seed

from finetune_api.render import STAGE_HISTORY_FILE, STAGE_TENSORBOARD_DIR, StageConfig, join_uri, stage_root
from finetune_api.spec import HELD_OUT_LOSS_STAGES
from finetune_trainer import model_card, modeling, storage, strategy
from finetune_trainer.data import StageData, load_stage_data
from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes import guards, suites
from finetune_trainer.reporting import (
    MetricsHistory,
    ReportChannel,
    Reporter,
    TrackerFeed,
    build_tracker_callbacks,
    progress_callback,
)


class StageContext:
    def __init__(
        self,
        config: StageConfig,
        reporter: Reporter | None,
        rank: int,
        world_size: int,
        work_dir: Path,
        local_rank: int = 0,
    ):
        self.config = config
        self.reporter = reporter
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.is_main = rank == 0
        self.work_dir = Path(work_dir)
        # metrics.jsonl lives beside the stage's outputs; on remote storage it is written here and uploaded with each
        # checkpoint and the final model.
        self.history_uri = join_uri(stage_root(config.storage, config.stage.name), STAGE_HISTORY_FILE)
        local_history = (
            self.work_dir / "metrics.jsonl"
            if storage.is_remote(self.history_uri)
            else storage.local_path(self.history_uri)
        )
        history = MetricsHistory(local_history) if self.is_main else None
        self.channel = ReportChannel(reporter, config.attempt, enabled=self.is_main, history=history)
        self.gpu = strategy.use_gpu(config.resources)
        self.precision = strategy.precision_flags(config.training.precision, self.gpu)
        self._cache = self.work_dir / "cache"
        self._endpoint = config.storage.endpoint_url
        self._tokenizers: dict[str, Any] = {}
        self._progress_clock: tuple[float, int] | None = None
        self._trackers: list | None = None
        self._tracker_feed: TrackerFeed | None = None
        self._hygiene: dict[str, int] = {}
        self._steps: dict[str, float] = {}
        # New heads and adapters initialise from the global generator when models load: seed it once, here.
        set_seed(config.training.seed)

    # ---- models -------------------------------------------------------------------------------------------------
    def _model_uri(self, uri: str | None) -> str:
        return uri or self.config.input_model

    def tokenizer(self, uri: str | None = None):
        """Tokenizer of `uri` (default: the stage's input model, or `spec.model.tokenizer` for the first stage)."""
        if uri is None:
            first_stage_override = self.config.stage_index == 0 and self.config.model.tokenizer
            uri = self.config.model.tokenizer if first_stage_override else self.config.input_model
        if uri not in self._tokenizers:
            self._tokenizers[uri] = modeling.load_tokenizer(uri, self.config.model, self._cache, self._endpoint)
        return self._tokenizers[uri]

    def _model_kwargs(self, trainable: bool) -> dict[str, Any]:
        return {
            "peft": self.config.peft,
            "trainable": trainable,
            "precision": self.precision,
            "gpu": self.gpu,
            "cache": self._cache,
            "endpoint_url": self._endpoint,
            "gradient_checkpointing": bool(self.config.training.gradient_checkpointing),
            "deepspeed": strategy.deepspeed_config(self.config.deepspeed) is not None,
            "attn_implementation": self.config.training.attn_implementation,
        }

    def causal_lm(self, uri: str | None = None, trainable: bool = True):
        """A causal LM; with `trainable` and a LoRA/QLoRA peft method it comes back wrapped as a PeftModel.

        Pass either this PeftModel or `peft_config()` to a TRL trainer, not both.
        """
        tokenizer = self.tokenizer(uri)
        return modeling.load_causal_lm(
            self._model_uri(uri), self.config.model, tokenizer, **self._model_kwargs(trainable)
        )

    def peft_config(self):
        """peft.LoraConfig (None for full fine-tuning), for code that wraps a model itself instead of using causal_lm()."""
        return modeling.lora_config(self.config.peft)

    def sequence_classifier(self, uri: str | None = None, trainable: bool = True):
        """AutoModelForSequenceClassification with one output (a scalar score) and the pad token id set."""
        tokenizer = self.tokenizer(uri)
        return modeling.load_sequence_classifier(
            self._model_uri(uri), self.config.model, tokenizer, **self._model_kwargs(trainable)
        )

    # ---- data ---------------------------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        """Where fetched models and data are cached for this attempt."""
        return self._cache

    def data(self, accepted: list[tuple[str, ...]], mixed_columns: bool = False) -> StageData:
        """The stage's data; its `hygiene_*` counts are added to the final metrics by `save_final`."""
        data = load_stage_data(self.config, accepted, cache=self._cache, mixed_columns=mixed_columns)
        self._hygiene = dict(data.hygiene)
        return data

    # ---- training -----------------------------------------------------------------------------------------------
    def trackers(self) -> list[str]:
        """`training.reportTo`, once each tracker's package is known to be importable and MLflow where to write."""
        wanted = list(self.config.training.report_to or [])
        packages = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow",), "wandb": ("wandb",)}
        for tracker in wanted:
            if not any(importlib.util.find_spec(name) for name in packages[tracker]):
                raise ConfigError(
                    f"spec.training.reportTo: {tracker!r} needs the {' or '.join(packages[tracker])} package, which "
                    "the trainer image lacks; install it in the image or drop the tracker"
                )
        if "mlflow" in wanted:
            _check_mlflow_tracking_uri()
        return wanted

    @property
    def tracker_callbacks(self) -> list:
        """The trackers' HF callbacks: the HF trainers get them from `callbacks()`, custom loops feed them through
        `report_progress()`; the same objects, so that the stage can end their runs (`close_trackers`)."""
        if self._trackers is None:
            self._trackers = build_tracker_callbacks(self.trackers(), self.tensorboard_dir)
        return self._trackers

    @property
    def tensorboard_uri(self) -> str:
        return join_uri(stage_root(self.config.storage, self.config.stage.name), STAGE_TENSORBOARD_DIR)

    @property
    def tensorboard_dir(self) -> Path:
        """Written in place on local storage; on remote storage here, then uploaded with the final model."""
        uri = self.tensorboard_uri
        return self.work_dir / "tensorboard" if storage.is_remote(uri) else storage.local_path(uri)

    def training_args(self, args_cls, **overrides):
        """An `args_cls` (TrainingArguments or a TRL config) filled from the resolved TrainingSpec, plus `overrides`."""
        training = self.config.training
        values: dict[str, Any] = {
            "output_dir": str(self.work_dir / "checkpoints"),
            "seed": training.seed,
            "data_seed": training.seed,
            "learning_rate": training.learning_rate,
            "lr_scheduler_type": training.lr_scheduler,
            "warmup_steps": training.warmup_ratio,  # a float below 1 is a ratio of the total steps
            "weight_decay": training.weight_decay,
            "per_device_train_batch_size": training.batch_size,
            "per_device_eval_batch_size": training.eval_batch_size or training.batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "num_train_epochs": training.epochs,
            "max_steps": training.max_steps or -1,
            "logging_steps": training.logging_steps,
            # The default filter averages NaN/inf steps away from the logged loss, hiding a divergence.
            "logging_nan_inf_filter": False,
            "save_strategy": "steps",
            "save_steps": training.save_steps,
            "save_total_limit": training.save_total_limit,
            "eval_strategy": "no",
            # One held-out evaluation before the first step gives the recipes their `eval_loss_before`.
            "eval_on_start": True,
            # What MLflow and W&B name the stage's run.
            "run_name": f"{self.config.job_name}-{self.config.stage.name}",
            # The trackers are among `callbacks()`, after the progress callback that adds tokens/s to the logs.
            "report_to": "none",
            # Throughput counts the tokens trained (the attention mask's), not the padding.
            "include_num_input_tokens_seen": "non_padding",
            "disable_tqdm": True,
            "use_cpu": not self.gpu,
            "activation_checkpointing": bool(training.gradient_checkpointing),
            "deepspeed": strategy.deepspeed_config(self.config.deepspeed),
            "dataloader_num_workers": 0,
            # LoRA freezes most weights; DDP must not wait for their (absent) gradients.
            "ddp_find_unused_parameters": False,
            **self.precision,
        }
        if self.world_size > 1:
            values["ddp_backend"] = strategy.backend(self.config.resources)
        field_names = {f.name for f in dataclasses.fields(args_cls)}
        if "max_length" in field_names:
            values["max_length"] = training.max_length
        if training.optimizer:
            strategy.check_optimizer(training.optimizer, self.gpu)
            values["optim"] = training.optimizer  # unset: transformers' default for the installed torch
        if self._watches_held_out_loss and training.eval_steps:
            values.update(eval_strategy="steps", eval_steps=training.eval_steps)
        if self._watches_held_out_loss and training.early_stopping:
            values.update(
                load_best_model_at_end=True,
                metric_for_best_model="eval_loss",
                greater_is_better=False,
                # Every evaluation may be the best, and only a saved one can be restored at the end.
                save_steps=training.eval_steps,
                # The patience counter continues across a resume.
                restore_callback_states_from_checkpoint=True,
            )
        values.update(overrides)
        unknown = sorted(set(values) - field_names)
        if unknown:
            raise TypeError(f"{args_cls.__name__} has no field(s) {', '.join(unknown)}")
        return args_cls(**values)

    @property
    def _watches_held_out_loss(self) -> bool:
        """evalSteps and earlyStopping apply to the HF Trainer stages; ppo and grpo inherit them from spec.training
        unused."""
        return self.config.stage.type in HELD_OUT_LOSS_STAGES

    def callbacks(self) -> list:
        # The divergence check first: it removes a non-finite checkpoint before the progress callback syncs it.
        callbacks = [
            guards.divergence_callback(self.config, loss_scaling=bool(self.precision.get("fp16"))),
            progress_callback(self.channel, self.checkpoint_saved),
            *self.tracker_callbacks,
        ]
        early_stopping = self.config.training.early_stopping
        if self._watches_held_out_loss and early_stopping:
            from transformers import EarlyStoppingCallback

            callbacks += [
                EarlyStoppingCallback(early_stopping.patience, early_stopping.min_delta),
                self._best_checkpoint_callback(),
            ]
        return callbacks

    def _best_checkpoint_callback(self):
        """Points a resumed run at the stage's copy of its best checkpoint (the scratch copy the state names is gone
        with the previous attempt), and records the steps trained and the best step for the final metrics."""
        from transformers import TrainerCallback

        ctx = self

        class BestCheckpointCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if state.best_model_checkpoint is None and state.best_global_step:
                    stored = dict(storage.list_checkpoints(ctx.config.checkpoint_dir, ctx._endpoint))
                    if state.best_global_step in stored:
                        best = state.best_global_step
                        state.best_model_checkpoint = ctx._local_checkpoint(best, stored[best])

            def on_train_end(self, args, state, control, **kwargs):
                ctx._steps = {
                    "train_steps": float(state.global_step),
                    "best_step": float(state.best_global_step or 0),
                }

        return BestCheckpointCallback()

    def close_trackers(self, failed: bool) -> None:
        """End the trackers' runs as the stage ends, with its outcome (every rank; rank 0's alone hold runs)."""
        if self._tracker_feed is not None:
            self._tracker_feed.end()
        for callback in self._trackers or []:
            if hasattr(callback, "end_run"):  # MLflow's run outlives training (reporting.mlflow_callback)
                callback.end_run(failed)

    def checkpoint_saved(self, local: Path, step: int) -> str:
        """Copy a freshly saved checkpoint to `config.checkpoint_dir` and report it; call on every rank.

        The completion marker goes last, from rank 0, so a half-copied checkpoint is never resumed from.
        """
        destination = join_uri(self.config.checkpoint_dir, local.name)
        strategy.barrier()
        if self.local_rank == 0 and local.is_dir():
            storage.upload_dir(local, destination, self._endpoint, exclude=(storage.CHECKPOINT_COMPLETE_FILE,))
        strategy.barrier()
        if self.is_main:
            storage.upload_file(
                local / storage.CHECKPOINT_COMPLETE_FILE,
                join_uri(destination, storage.CHECKPOINT_COMPLETE_FILE),
                self._endpoint,
            )
            kept = storage.list_checkpoints(self.config.checkpoint_dir, self._endpoint)
            # The latest (to resume from) and the best (early stopping's) stay, as in transformers' own rotation.
            keep = {kept[-1][0], _best_step(local)}
            excess = len(kept) - (self.config.training.save_total_limit or len(kept))
            for _, old in [(step, uri) for step, uri in kept if step not in keep][: max(0, excess)]:
                storage.delete(old, self._endpoint)
            self.channel.checkpoint(destination, step)
            self.publish_history()
        strategy.barrier()
        return destination

    def publish_history(self) -> None:
        """Copy metrics.jsonl and the TensorBoard logs to remote storage (rank 0; local storage is written in place)."""
        history = self.channel.history
        if history is None or not storage.is_remote(self.history_uri):
            return
        if history.path.exists():
            storage.upload_file(history.path, self.history_uri, self._endpoint)
        if self.tensorboard_dir.is_dir():
            storage.upload_dir(self.tensorboard_dir, self.tensorboard_uri, self._endpoint)

    def resume_checkpoint(self) -> str | None:
        """Local path of this stage's latest complete checkpoint (fetched when remote), or None on a fresh start."""
        checkpoints = storage.list_checkpoints(self.config.checkpoint_dir, self._endpoint)
        if not checkpoints:
            return None
        step, uri = checkpoints[-1]
        path = self._local_checkpoint(step, uri)
        self.log(f"resuming from {uri} (step {step})")
        return path

    def _local_checkpoint(self, step: int, uri: str) -> str:
        """A local path of the stored checkpoint `uri`, fetched first when remote (call on every rank)."""
        if not storage.is_remote(uri):
            return str(storage.local_path(uri))
        path = self._cache / "resume" / f"checkpoint-{step}"
        if self.local_rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            fetched = storage.fetch_dir(uri, self._cache / "resume-download", self._endpoint)
            path.parent.mkdir(parents=True, exist_ok=True)
            fetched.rename(path)
        strategy.barrier()
        return str(path)

    def save_final(self, model, tokenizer, metrics: dict[str, float]) -> str:
        """Check the stage's final `metrics` and weights and write the stage output to `config.output_uri`: the
        merged model and/or the adapter (`stage.export`), the tokenizer and a model card. Call on every rank; rank 0
        writes.

        Non-finite metrics or weights fail the stage (TrainingDiverged), and so does a held-out loss that dropped less
        than `training.minImprovement` (QualityGateFailed); nothing is written then. The stage's evaluation suites
        are scored here on the input model and on `model` (their metrics are added to `metrics`), and a suite worse
        than its `maxRegression` fails the stage (ForgettingDetected).

        Under ZeRO-3 only rank 0 ever holds the whole model: the ranks gather its partitioned weights into a CPU state
        dict on rank 0, one module at a time; rank 0 loads them into a plain copy of the model, then scores, checks
        and writes it alone, and every rank ends with its verdict (its error, or its metrics).
        """
        metrics.update({key: float(value) for key, value in self._hygiene.items()})
        metrics.update(self._steps)
        guards.check_metrics(self.config, metrics)
        guards.check_improvement(self.config, metrics)
        output = self.config.output_uri
        model = getattr(model, "module", model)  # DDP / DeepSpeed engine wrappers
        if strategy.is_zero3(self.config.deepspeed):
            weights = strategy.gather_to_rank_0(model)

            def save_on_rank_0() -> dict[str, float]:
                with self._whole_model_loading():
                    whole = modeling.plain_copy(model, weights)
                self._check_and_write(whole, tokenizer, output, metrics, every_rank=False)
                return metrics

            metrics.update(strategy.on_rank_0(save_on_rank_0))
        else:
            self._check_and_write(model, tokenizer, output, metrics, every_rank=True)
        strategy.barrier()
        if self.channel.history is not None:
            self.channel.history.append(self.channel.report.step, metrics, final=True)
            self.publish_history()
        return output

    def _check_and_write(self, model, tokenizer, output: str, metrics: dict[str, float], every_rank: bool) -> None:
        """Score the suites on `model`, check its weights and, on rank 0, write it. With `every_rank`, every rank
        calls this with its own copy (or shard) and the weight check spans them all; without it, only this rank does."""
        self._score_suites(model, tokenizer, metrics)
        guards.check_weights(self.config, model, every_rank=every_rank)
        if self.is_main:
            self._write_final(model, tokenizer, output, metrics)

    def _score_suites(self, model, tokenizer, metrics: dict[str, float]) -> None:
        if not self.config.suites:
            return
        # The input model is loaded whole for scoring.
        with self._whole_model_loading():
            suites.score_and_gate(self, model, tokenizer, metrics)

    @contextlib.contextmanager
    def _whole_model_loading(self):
        """Under ZeRO-3, models loaded in this block load whole: ZeRO-3's partitioned loading would leave them without
        weights outside a DeepSpeed engine, and hang on a collective when only rank 0 loads."""
        if not strategy.is_zero3(self.config.deepspeed):
            yield
            return
        from transformers.integrations.deepspeed import (
            _hf_deepspeed_config_weak_ref,
            set_hf_deepspeed_config,
            unset_hf_deepspeed_config,
        )

        active = _hf_deepspeed_config_weak_ref() if _hf_deepspeed_config_weak_ref is not None else None
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if active is not None:
                set_hf_deepspeed_config(active)

    def _write_final(self, model, tokenizer, output: str, metrics: dict[str, float]) -> None:
        staging = self.work_dir / "final-model"
        shutil.rmtree(staging, ignore_errors=True)
        export = self.config.stage.export
        adapter = None
        if export != "merged":
            adapter = staging / model_card.ADAPTER_DIR
            modeling.save_adapter(model, tokenizer, adapter, model_card.hub_or_uri(self.config.input_model))
            # In place of PEFT's template card.
            (adapter / "README.md").write_text(model_card.render(self.config, metrics, adapter=True), encoding="utf-8")
        if export != "adapter":
            modeling.save_pretrained(self._merged(model, tokenizer, adapter), tokenizer, staging)
        else:
            tokenizer.save_pretrained(staging)
        card = model_card.render(self.config, metrics, adapter=export == "adapter")
        (staging / "README.md").write_text(card, encoding="utf-8")
        if storage.is_remote(output):
            storage.delete(output, self._endpoint)
            # config.json (adapter_config.json without a merged model) last: a model directory without it is incomplete.
            storage.upload_dir(staging, output, self._endpoint, last=("config.json", "adapter_config.json"))
        else:
            target = storage.local_path(output)
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staging), target)
        self.log(f"saved final model to {output}")

    def _merged(self, model, tokenizer, adapter: Path | None):
        """The stage's merged model (rank 0). LoRA's adapters fold into the trained model in memory; QLoRA's adapter,
        saved to `adapter` (or, when the stage keeps no adapter, to a scratch directory), folds into the input model
        reloaded unquantized in bf16 on the CPU instead of into the trained model's 4-bit weights
        (modeling.reload_and_merge)."""
        if self.config.peft.method != "qlora":
            return modeling.merged(model)
        if adapter is None:
            adapter = self.work_dir / "qlora-adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            modeling.save_adapter(model, tokenizer, adapter, model_card.hub_or_uri(self.config.input_model))
        self.log(f"merging the QLoRA adapter into {self.config.input_model}, reloaded in bf16")
        with self._whole_model_loading():
            return modeling.reload_and_merge(
                adapter,
                self.config.input_model,
                self.config.model,
                tokenizer,
                cache=self._cache,
                endpoint_url=self._endpoint,
            )

    # ---- reporting ----------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[{self.config.stage.name}] {message}", flush=True)

    def report_progress(
        self,
        step: int,
        total: int,
        loss: float | None = None,
        tokens_per_second: float | None = None,
        **extra: float,
    ) -> None:
        """Progress from a custom training loop (rank 0 only) into the report, metrics.jsonl and the trackers; the ETA
        is extrapolated from the pace so far, `tokens_per_second` is the loop's own measure (reporting.TokenRate)."""
        if not self.is_main:
            return
        now = time.monotonic()
        if self._progress_clock is None:
            self._progress_clock = (now, step)
        started, first_step = self._progress_clock
        eta = (now - started) / (step - first_step) * (total - step) if step > first_step else None
        measured = {"loss": loss, "tokens_per_second": tokens_per_second}
        values = {**{key: value for key, value in measured.items() if value is not None}, **extra}
        self.channel.record(step, values)
        self.channel.progress(step, total, loss=loss, eta=eta, tokens_per_second=tokens_per_second, **extra)
        if self.tracker_callbacks:
            self._feed_trackers(total).log(step, total, values)

    def _feed_trackers(self, total: int) -> TrackerFeed:
        if self._tracker_feed is None:
            from transformers import TrainingArguments

            # The run's parameters, as an HF stage records them; DeepSpeed's config stays out of it, because
            # TrainingArguments would set it up (globally) as if an HF Trainer were to run.
            args = self.training_args(TrainingArguments, deepspeed=None, max_steps=total)
            self._tracker_feed = TrackerFeed(self.tracker_callbacks, args)
        return self._tracker_feed


def _best_step(checkpoint: Path) -> int | None:
    """The best evaluation's step a saved checkpoint's trainer state records (with early stopping), if any."""
    state = checkpoint / storage.CHECKPOINT_COMPLETE_FILE
    return json.loads(state.read_text()).get("best_global_step") if state.is_file() else None


def _check_mlflow_tracking_uri() -> None:
    """The trainer image's mlflow-skinny writes to an MLflow server (or Databricks), or to a file store that MLflow 3
    only opens when MLFLOW_ALLOW_FILE_STORE is true; its default (a local SQLite database) needs the full package."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    where = "in the trainer's environment (a Secret named in envFromSecrets)"
    if not uri:
        raise ConfigError(
            f"spec.training.reportTo: 'mlflow' needs MLFLOW_TRACKING_URI {where}: an MLflow server's http(s):// URL, "
            "databricks, or file://DIR with MLFLOW_ALLOW_FILE_STORE=true"
        )
    if uri.startswith("file:") and not MLFLOW_ALLOW_FILE_STORE.get():
        raise ConfigError(
            f"spec.training.reportTo: 'mlflow' with the file store {uri} needs MLFLOW_ALLOW_FILE_STORE=true {where}"
        )
