"""The KServe side of bench/serving.py: run with KServe's venv python (bench/setup_kserve.sh), never
the project's. The model is written as KServe's docs write a custom v2 model; its response is built
as KServe's own `get_predict_response` builds one, so KServe honours what the client asked for:
binary outputs over REST (`binary_data` / `binary_data_output`), raw outputs over gRPC for raw
inputs.

    <kserve venv>/bin/python bench/_serving_kserve.py --checkpoint DIR --model NAME --port P [--grpc-port G]
"""

from __future__ import annotations

import argparse
import logging
import sys


def serve(checkpoint_dir: str, model_name: str, port: int, threads: int, grpc_port: int = 0) -> None:
    import torch
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

    from aidc_trainer.checkpoint import build_model_from_manifest, load_latest

    torch.set_num_threads(threads)

    class CheckpointModel(Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.load()

        def load(self) -> bool:
            loaded = load_latest(checkpoint_dir, None)
            net = build_model_from_manifest(loaded.manifest)
            net.load_state_dict(loaded.state["model"])
            self.net = net.eval()
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            x = torch.from_numpy(payload.inputs[0].as_numpy())
            with torch.inference_mode():
                y = self.net(x).numpy()
            out = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
            out.set_data_from_numpy(y, binary_data=payload.use_binary_outputs)
            return InferResponse(
                model_name=self.name,
                infer_outputs=[out],
                response_id=payload.id,
                use_binary_outputs=payload.use_binary_outputs,
                requested_outputs=payload.request_outputs,
            )

    server = ModelServer(
        http_port=port,
        grpc_port=grpc_port or 8081,
        enable_grpc=bool(grpc_port),
        workers=1,
        enable_latency_logging=False,
    )
    # KServe's log config puts uvicorn's access log at INFO (one line per request, as aidc_server
    # does not do); KSERVE_LOGLEVEL does not reach it. Silence it so neither server logs requests.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([CheckpointModel(model_name)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, default=0, help="0: no gRPC server")
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args()
    sys.argv = sys.argv[:1]  # KServe parses sys.argv itself at import
    serve(args.checkpoint, args.model, args.port, args.torch_threads, args.grpc_port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
