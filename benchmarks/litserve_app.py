"""The bundled default model behind LitServe (0.2.19), for ``benchmarks/serve_compare.py``.

Same architecture and weights (loaded through ``robustnorm.load_model``), same preprocessing
(``service.imaging.decode_image`` with the card's size, mean and std), same answer (softmax, top-5 labels) as
the robustnorm service, but LitServe's batching: ``max_batch_size`` requests or ``batch_timeout`` seconds,
one inference worker, one API server process. The model runs in eval mode with frozen statistics (the
population statistics of the card, ``--policy frozen``: what a plain deployment of the model runs); another
policy (``--policy batch``, ...) runs each LitServe batch as one statistics group through
``robustnorm.batch_groups``, without streams, drift report or metrics.

Requests: ``POST /predict`` with a ``multipart/form-data`` body whose part ``file`` is the image (LitServe hands
a form to ``decode_request``; it reads no raw image bodies). ``GET /health`` answers ``ok`` once the worker is up.

    python benchmarks/litserve_app.py --port 8001 --max-batch-size 32 --batch-timeout 0.005 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import litserve as ls
import torch

import robustnorm
from service.engines import default_model
from service.imaging import Preprocessing, decode_image

logger = logging.getLogger("litserve_app")

TOP_K = 5


class RobustNormAPI(ls.LitAPI):
    """One robustnorm model: decode each request's image, batch, forward, top-k per image."""

    def __init__(self, model: str, policy: str, threads: int, *, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_name = model
        self.policy = robustnorm.parse_policy(policy)
        self.threads = threads

    def setup(self, device: str) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = torch.device(device)
        self.model, self.card = robustnorm.load_model(self.model_name, device=self.device)
        channels, height, width = (int(v) for v in self.card.input_size)
        self.spec = Preprocessing(channels=channels, height=height, width=width, mean=tuple(self.card.mean),
                                  std=tuple(self.card.std), max_pixels=25_000_000)
        logger.info("LitServe worker: %s (version %s) on %s, policy %s, %d torch thread(s)", self.card.name,
                    self.card.version, self.device, self.policy, torch.get_num_threads())

    def decode_request(self, request) -> torch.Tensor:
        # No annotation: LitServe reads it to choose the request type, and without one hands over the form.
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return decode_image(data, self.spec)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        with torch.inference_mode(), robustnorm.batch_groups(self.model, [x.shape[0]], policy=self.policy):
            return self.model(x).float().softmax(dim=1).cpu()

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        probabilities, indices = output.topk(min(TOP_K, output.numel()))
        return {"predictions": [{"label": self.card.labels[i], "index": i, "probability": p}
                                for p, i in zip(probabilities.tolist(), indices.tolist())]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundled model name or model directory (default: the service's default)")
    parser.add_argument("--policy", default="frozen", help="statistics policy per batch (default frozen)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds (default 0.005)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = RobustNormAPI(args.model or default_model(), args.policy, args.threads, max_batch_size=args.max_batch_size,
                        batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.device, devices=1, workers_per_device=1, timeout=30)
    server.run(host=args.host, port=args.port, num_api_servers=1, log_level=args.log_level,
               generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
