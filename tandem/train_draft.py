"""`tandem train-draft`: train a draft head (speculative_config method "eagle") for a model.

Thin CLI glue over engine.spec.train_head (which says what is trained and how); registered on
the `tandem` app in tandem/cli.py. Heavy imports (torch) happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from engine.errors import TandemError


def train_draft(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, .gguf, or 'demo'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the head.")],
    prompts: Annotated[
        str, typer.Option(help="'sharegpt' (ShareGPT V3) or a text file, one prompt a line.")
    ] = "sharegpt",
    max_prompts: Annotated[int, typer.Option(min=1, help="Prompts to use at most.")] = 64,
    skip_prompts: Annotated[
        int, typer.Option(min=0, help="Leave out the first N prompts (kept for evaluation).")
    ] = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per prompt.")] = 64,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the collected features.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per optimizer step.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the head's init and shuffling.")] = 0,
) -> None:
    """Train a draft head for MODEL on its own greedy generations (self-distillation).

    Serve it with --speculative-config '{"method": "eagle", "model": OUT, ...}'."""
    from engine.spec.train_head import TrainOptions, load_prompts
    from engine.spec.train_head import train_draft as run

    console = Console()
    try:
        options = TrainOptions(
            max_prompts=max_prompts,
            skip_prompts=skip_prompts,
            max_tokens=max_tokens,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=lr,
            seed=seed,
            device=device,
        )
        texts = load_prompts(prompts, max_prompts, skip_prompts)
        report = run(model, out, texts, options)
    except TandemError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    losses = ", ".join(f"{x:.3f}" for x in report.epoch_losses)
    console.print(
        f"Wrote {report.out_dir}: {report.num_prompts} prompts, {report.num_positions} "
        f"positions; loss per epoch {losses}; step-1 agreement {report.train_accuracy:.1%} "
        f"(train); seconds {report.seconds}",
        highlight=False,
        markup=False,
    )
