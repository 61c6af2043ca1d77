"""One run: a ``Spec`` trained through ``transformers.Trainer`` / ``CAGETrainer`` as the recipes train, and its
result line."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from .spec import BRANCH_POINTS, VOCAB, Spec


def prepare_data(out: Path, spec: Spec):
    """Tokenizer, training blocks and the first ``eval_blocks`` validation blocks (Shakespeare, split by play)."""
    from hf_cage.data import load_token_blocks, shakespeare_files, train_bpe_tokenizer, write_document_split

    files = shakespeare_files()
    if spec.vocab != VOCAB:  # the quick smoke run: a few plays
        files = sorted(files)[:4]
    train_txt, val_txt = write_document_split(files, out / f"data-{len(files)}")
    tokenizer = train_bpe_tokenizer([train_txt], vocab_size=spec.vocab, cache_dir=out / "cache")
    train = load_token_blocks([train_txt], tokenizer, spec.block)
    val = load_token_blocks([val_txt], tokenizer, spec.block)
    return tokenizer, train, val.select(range(min(spec.eval_blocks, len(val))))


def training_args(spec: Spec, output_dir: Path):
    """The ``CAGEConfig`` of ``spec``: the tiny preset's optimizer and schedule, no evaluation or saving."""
    from hf_cage import CAGEConfig

    quantized = spec.method != "bf16"
    return CAGEConfig(
        output_dir=str(output_dir),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch,
        per_device_eval_batch_size=32,
        learning_rate=spec.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        use_cpu=True,
        seed=spec.seed,
        data_seed=spec.data_seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, spec.steps // 20),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
        remove_unused_columns=False,
        quant_w_bits=spec.w_bits if quantized else 4,
        quant_a_bits=spec.a_bits if quantized else 4,
        quant_quantizer=spec.quantizer,
        quant_granularity="group" if spec.group else "channel",
        quant_group_size=spec.group,
        cage_lambda=spec.cage_lambda(),
        cage_silence_ratio=spec.silence,
        cage_variant=spec.variant,
    )


def checkpoint_dir(out: Path, spec: Spec, step: int) -> Path:
    return out / "runs" / spec.key / f"checkpoint-{step}"


def train(spec: Spec, out: Path) -> dict:
    """Train ``spec`` through the Trainer and return its result line."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        default_data_collator,
        set_seed,
    )

    from hf_cage import CAGETrainer
    from hf_cage.trainer.comparison import SaveCheckpointsAt, block_decay_trainer_class

    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer, train_blocks, val_blocks = prepare_data(out, spec)
    run_dir = out / "runs" / spec.key
    args = training_args(spec, run_dir)
    set_seed(spec.seed)
    if spec.init is not None:
        model = AutoModelForCausalLM.from_pretrained(out / "models" / spec.init, dtype=torch.float32)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden,
            intermediate_size=spec.ffn,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=spec.block,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config).to(torch.float32)
    callbacks = []
    if spec.method == "ste":  # the checkpoints CAGE runs branch from
        callbacks.append(SaveCheckpointsAt(lambda total: {round(f * total) for f in BRANCH_POINTS}))
    cls = CAGETrainer
    if spec.method == "bf16":
        cls = block_decay_trainer_class(Trainer) if spec.bf16_decay == "blocks" else Trainer
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=val_blocks,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    resume = None
    if spec.parent is not None:
        resume = checkpoint_dir(out, spec.parent, spec.branch_step)
        if not resume.is_dir():
            raise FileNotFoundError(f"{resume}: the parent STE run has no checkpoint at step {spec.branch_step}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_loss = float(trainer.evaluate()["eval_loss"])
    if spec.save:
        trainer.save_model(str(out / "models" / spec.key))
        tokenizer.save_pretrained(str(out / "models" / spec.key))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        **asdict(spec),
        "key": spec.key,
        "eval_loss": eval_loss,
        "train_loss_last": losses[-1] if losses else None,
        "steps_trained": spec.steps - (spec.branch_step if resume else 0),
        "tokens_per_block_param": spec.tokens_per_block_param,
        "seconds": round(time.perf_counter() - start, 1),
        "final_weights_sha": weights_digest(trainer.model),
        "code_commit": os.environ.get("HF_CAGE_CODE_COMMIT"),
        "cage_lambda": args.cage_lambda,
    }


def weights_digest(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
