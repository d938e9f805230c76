"""The training loop of ``parcae train``: one Accelerate loop for a laptop CPU, multi-GPU DDP/FSDP and multi-node.

Per optimizer step every process takes the same global batch of ``global_batch_size`` packed rows, keeps its slice
and splits it into micro-batches (gradient accumulation, ``no_sync`` until the last one). The model samples its
depth per sequence from ``depth_sampling_seed + depth_sampling_step``; all processes share that counter, so they run
the same number of loops on every micro-batch (FSDP needs identical collective sequences, and DDP stays in lock
step). The official code instead offsets the seed by rank; here sequences at the same batch position on different
ranks share a depth, while depths still vary across positions and steps.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM, load_preset, load_tokenizer

from modeling_parcae.atomic import write_atomically
from modeling_parcae.compilation import compile_blocks, compile_loss
from modeling_parcae.inputs import local_path_or_hub_id
from modeling_parcae.scoring import pad_id_of, token_byte_lengths
from modeling_parcae.training.checkpoint import latest_checkpoint, remove_leftovers, save_checkpoint, save_final_model
from modeling_parcae.training.data import RowStream, build_training_data
from modeling_parcae.training.distributed import enable_fsdp_on_cpu, fsdp_requested, prepare_model_and_optimizers
from modeling_parcae.training.evaluation import validation_metrics
from modeling_parcae.training.optim import (
    apply_schedule, build_optimizers, build_schedulers, set_muon_step_hyperparameters,
)
from modeling_parcae.training.recipe import ModelRecipe, Recipe, flatten_recipe, recipe_to_dict
from modeling_parcae.training.resume import check_resumable, describe_resumed_changes, write_recipe


class TrainState:
    """Everything about progress that is not a tensor, saved with each checkpoint (``register_for_checkpointing``)."""

    def __init__(self, rows: RowStream):
        self.rows = rows
        self.step = 0
        self.skipped_steps = 0
        self.depth_sampling_step = 0  # sampled training forwards so far: the model draws each one's depth from it

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "rows": self.rows.state_dict(),
                "depth_sampling_step": self.depth_sampling_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.rows.load_state_dict(state["rows"])
        self.depth_sampling_step = state["depth_sampling_step"]


def resolve_mixed_precision(requested: str) -> str:
    """bf16 autocast only on GPUs that support it; CPU runs train in fp32. Weights and optimizer states stay fp32
    either way (Accelerate's autocast casts per op)."""
    if requested == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def resolve_compile(requested: bool | None) -> bool:
    """``training.compile: null`` compiles where CUDA is present (see ``TrainingRecipe.compile``)."""
    return torch.cuda.is_available() if requested is None else requested


def build_model(recipe: ModelRecipe, tokenizer) -> ParcaeForCausalLM:
    """A freshly initialised ``ParcaeForCausalLM`` from a preset plus overrides, with the tokenizer's special ids."""
    fields = dict(recipe.config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    config = load_preset(recipe.preset, **fields) if recipe.preset else ParcaeConfig(**fields)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}")
    model = ParcaeForCausalLM(config)
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def parameters_without_gradient(model: torch.nn.Module) -> list[str]:
    """Names of parameters outside the autograd graph of a training-mode forward/backward through every block.

    Some layouts own value-embedding tables or gates that the official rules never pair up (e.g. P=R=C=1); DDP must
    then be told to look for unused parameters, or it fails on the first step.
    """
    was_training = model.training
    model.train()
    probe = torch.zeros(1, 4, dtype=torch.long)
    depth = {"num_loops": (0, 1)} if model.config.looped else {}
    model(input_ids=probe, **depth).logits.float().sum().backward()
    unused = [name for name, parameter in model.named_parameters()
              if parameter.requires_grad and parameter.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def unused_parameters_notice(unused: list[str], world: int) -> str:
    """The console line naming the parameters without gradient, and how the data-parallel wrapper that runs takes
    them: DDP must be told (``find_unused_parameters``), FSDP shards them with the rest."""
    wrapper = ""
    if world > 1:
        wrapper = " (FSDP shards them with the others)" if fsdp_requested() else " (DDP is told to expect that)"
    return f"these parameters never receive a gradient in this layout and keep their initial values{wrapper}: " + \
        ", ".join(unused)


def train(recipe: Recipe, resume: str | None = None) -> Path:
    """Run a recipe to the end; returns the folder of the final ``save_pretrained`` model.

    ``resume``: ``"latest"`` (newest checkpoint in ``output_dir/checkpoints``) or a checkpoint folder.
    """
    output_dir = Path(recipe.output_dir)
    checkpoints = output_dir / "checkpoints"
    settings = recipe.training
    # without a GPU, torchrun-launched processes (`accelerate launch --multi_gpu`) must be told to use gloo on CPU
    cpu = not torch.accelerator.is_available()
    process = PartialState(cpu=cpu)
    world = process.num_processes
    per_process = settings.global_batch_size // world
    if settings.global_batch_size % world or per_process % settings.micro_batch_size:
        raise ValueError(
            f"training.global_batch_size ({settings.global_batch_size}) must split into {world} process(es) x "
            f"whole micro-batches of training.micro_batch_size ({settings.micro_batch_size})"
        )
    resume_from = _resolve_resume(resume, checkpoints)
    changes = check_resumable(resume_from, recipe) if resume_from is not None else {}
    if process.is_main_process:
        remove_leftovers(output_dir)

    tokenizer = load_tokenizer(local_path_or_hub_id(recipe.tokenizer, "tokenizer"))
    rows, validation_documents = build_training_data(recipe.data, tokenizer, recipe.seed, process.main_process_first)
    set_seed(recipe.seed)
    model = build_model(recipe.model, tokenizer)
    unused = parameters_without_gradient(model)
    if unused and process.is_main_process:
        print(unused_parameters_notice(unused, world))
    set_seed(recipe.seed)  # the probe drew random initial states: restart the stream so runs depend on the seed only
    model.train()
    if resolve_compile(settings.compile):
        # before prepare, so DDP/FSDP2 wrap the compiled blocks and their hooks stay outside the graphs; dynamic=False
        # as the official recipe: every step has the same shapes
        compile_blocks(model, backend=settings.compile_backend, dynamic=False)
        compile_loss(model, backend=settings.compile_backend, dynamic=False)
        process.print(f"compiling each block and the loss ({settings.compile_backend}); the first step includes "
                      "the compile")
    mixed_precision = resolve_mixed_precision(settings.mixed_precision)
    if mixed_precision != settings.mixed_precision:
        process.print(f"training.mixed_precision={settings.mixed_precision} needs a bf16-capable GPU: training in "
                      f"float32 here")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=recipe.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(unused))],
    )
    enable_fsdp_on_cpu(accelerator)
    tokens_per_step = settings.global_batch_size * recipe.data.block_size
    total_steps = settings.max_steps or int(settings.max_tokens // tokens_per_step)
    if total_steps < 1:
        raise ValueError("training.max_tokens is smaller than one global batch")
    model, optimizers = prepare_model_and_optimizers(accelerator, model, lambda m: build_optimizers(m, settings))
    # the schedules drive the torch optimizers themselves, not Accelerate's wrappers around them
    schedulers = build_schedulers([getattr(o, "optimizer", o) for o in optimizers], settings, total_steps)
    state = TrainState(rows)
    for scheduler in schedulers:  # not prepared: Accelerate would step them once per process
        accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(state)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if state.step > total_steps:
            raise ValueError(f"{resume_from} is at step {state.step}, past the {total_steps} steps of this recipe; "
                             "give a longer training.max_steps / max_tokens")
        apply_schedule(schedulers)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        if changes:
            accelerator.print(describe_resumed_changes(changes, state.step + 1, total_steps,
                                                       optimizers[-1].param_groups[0]["lr"]))
        if accelerator.is_main_process:
            truncate_metrics(output_dir / "metrics.jsonl", state.step)

    accelerator.init_trackers(recipe.run_name, config=_flat_hparams(recipe_to_dict(recipe)))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        kept = write_recipe(output_dir, recipe, changes, state.step)
        if kept:
            print(kept)
    config = accelerator.unwrap_model(model).config
    eval_depths = recipe.eval.depths if config.looped else None
    byte_lengths = token_byte_lengths(tokenizer, config.vocab_size)
    muon = optimizers[0] if len(optimizers) == 2 else None
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc=recipe.run_name, dynamic_ncols=True)

    while state.step < total_steps:
        started = time.perf_counter()
        batch = rows.next_rows(settings.global_batch_size)
        local = batch[accelerator.process_index * per_process:(accelerator.process_index + 1) * per_process]
        if muon is not None:
            set_muon_step_hyperparameters(muon, settings, state.step, total_steps)
        loss, depth = _accumulate_gradients(model, accelerator, local.split(settings.micro_batch_size), state)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            for optimizer in optimizers:
                optimizer.step()
        else:
            state.skipped_steps += 1
            accelerator.print(f"step {state.step + 1}: non-finite gradient norm ({grad_norm.item()}); "
                              "optimizer step skipped")
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        learning_rate = optimizers[-1].param_groups[0]["lr"]  # the AdamW rate this step used (Muon's: same shape)
        for scheduler in schedulers:
            scheduler.step()
        state.step += 1

        loss_value = accelerator.reduce(loss, reduction="mean").item()
        elapsed = time.perf_counter() - started
        record = {
            "step": state.step, "train/loss": loss_value, "train/lr": learning_rate,
            "train/grad_norm": grad_norm.item(), "train/tokens_per_s": tokens_per_step / elapsed,
            "train/depth": float(config.num_loops) if depth is None else depth,
            "train/skipped": not finite, "train/skipped_steps": state.skipped_steps,
        }
        is_last = state.step == total_steps
        evaluate_now = is_last or (recipe.eval.every_steps and state.step % recipe.eval.every_steps == 0)
        if validation_documents and evaluate_now:
            record.update(validation_metrics(model, accelerator, validation_documents, byte_lengths, eval_depths,
                                             recipe.eval.batch_size, pad_id_of(tokenizer)))
            if accelerator.is_main_process:
                progress.write(_validation_line(record))
        _log(accelerator, output_dir, record, recipe.log_every_steps, is_last)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['train/lr']:.2e}",
                             tok_s=f"{record['train/tokens_per_s']:.0f}", depth=f"{record['train/depth']:.1f}")
        if is_last or (recipe.checkpoint.every_steps and state.step % recipe.checkpoint.every_steps == 0):
            save_checkpoint(accelerator, checkpoints, state.step, recipe.checkpoint.keep_last)
    progress.close()

    final = output_dir / "final"
    accelerator.wait_for_everyone()
    save_final_model(accelerator, model, tokenizer, final)
    accelerator.print(f"final model saved to {final}")
    accelerator.end_training()
    return final


def _accumulate_gradients(model, accelerator: Accelerator, micro_batches: tuple[torch.Tensor, ...],
                          state: TrainState) -> tuple[torch.Tensor, float | None]:
    """Forward/backward over the micro-batches of one optimizer step (gradients synchronised on the last only).

    Each row is ``block_size + 1`` tokens: inputs ``row[:-1]``, targets ``row[1:]``, every position counted, as in
    the official loop. Each forward draws its depth from the run's sampling step (``state``), which the loop owns and
    checkpoints. Returns the mean loss and the mean sampled depth (None for the loop-free baseline).
    """
    losses, depths = [], []
    for index, rows in enumerate(micro_batches):
        rows = rows.to(accelerator.device)
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            # the plain head and loss: on an H200 the compiled step with them took 49 ms where chunked_loss=True took
            # 106 ms (for 7.4 GiB instead of 12.8), then with its head in float32 under autocast (fixed since; to be
            # re-measured: docs/performance.md)
            outputs = model(input_ids=rows[:, :-1], shift_labels=rows[:, 1:],
                            depth_sampling_step=state.depth_sampling_step)
            state.depth_sampling_step += 1
            loss = outputs.loss
            accelerator.backward(loss / len(micro_batches))
        losses.append(loss.detach())
        if outputs.num_loops is not None:
            depths.append(outputs.num_loops.float().mean())
    return torch.stack(losses).mean(), (torch.stack(depths).mean().item() if depths else None)


def _resolve_resume(resume: str | None, checkpoints: Path) -> Path | None:
    if resume is None:
        if latest_checkpoint(checkpoints) is not None:
            raise ValueError(f"{checkpoints} already holds checkpoints: pass --resume to continue that run, or "
                             "choose another output_dir")
        return None
    path = latest_checkpoint(checkpoints) if resume == "latest" else Path(resume)
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"no checkpoint to resume from ({resume!r}; looked in {checkpoints})")
    return path


def _log(accelerator: Accelerator, output_dir: Path, record: dict, every: int, force: bool) -> None:
    """Trackers (TensorBoard by default) plus ``metrics.jsonl``, which tests and scripts read without TensorBoard."""
    step = record["step"]
    if not force and step % max(every, 1) and not any(key.startswith("val/") for key in record):
        return
    accelerator.log({key: float(value) for key, value in record.items() if key != "step"}, step=step)
    if accelerator.is_main_process:
        with open(output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _validation_line(record: dict) -> str:
    """``step 8 validation: loss@1 5.230 (bpb 2.41) ...`` for the console, next to the progress bar."""
    parts = [f"{key.removeprefix('val/')} {value:.4f} (bpb {record[key.replace('/loss', '/bpb')]:.3f})"
             for key, value in record.items() if key.startswith("val/loss")]
    return f"step {record['step']} validation: " + "  ".join(parts)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (logged by the interrupted run after its last checkpoint), so that the resumed
    run's records continue the file and no curve goes backwards. A final line cut short by the kill is dropped too;
    a broken line elsewhere is an error naming the file and line. The file is replaced atomically."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a JSON record: {line[:80]!r}") from None
        if record["step"] <= step:
            kept.append(line + "\n")
    write_atomically(path, lambda temporary: temporary.write_text("".join(kept), encoding="utf-8"))


def _flat_hparams(tree: dict) -> dict:
    """Trackers accept scalars only: flatten sections with dots and render lists/None as strings."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten_recipe(tree).items()}
