"""The limit the models set: their own CPU per frame, in-process, at their best batch.

For each frame set the peer's batch step (``peer.PipelineAPI.predict``: sign detector with its classifier, hazard
cells, the reader over every text sign's crop, and the answer's JSON; describe=false) runs over the decoded frames
in batches of each size, every runtime on one thread (the least CPU a frame can cost: more threads buy time, not
CPU), and the process's CPU time per frame is taken at the best size. A server's serving efficiency is this over
its CPU per answer at 16 clients (``run.summarize``): how much of what it spends goes to the models.
"""

from __future__ import annotations

import statistics
import time

from festival_serve.pipeline.settings import PipelineArgs


def model_cpu_per_frame(args: PipelineArgs, frame_sets: dict[str, list[bytes]], *, batch_sizes: list[int],
                        repeats: int, progress) -> dict[str, dict]:
    """``{frames: {"ms_per_frame", "batch", "by_batch": {size: ms}}}``: median CPU ms per frame over ``repeats``
    passes over the set, at the batch size where it is least."""
    from festival_serve.measure.bench.peer import PipelineAPI
    from festival_serve.measure.bench.servers import with_threads
    from festival_serve.serving.imaging import decode_image

    api = PipelineAPI(with_threads(args, 1))
    api.setup("cpu")
    out: dict[str, dict] = {}
    for frames, bodies in frame_sets.items():
        if not bodies:
            continue
        images = [decode_image(body, max_pixels=args.ingress.max_image_pixels) for body in bodies]
        by_batch: dict[int, float] = {}
        for size in batch_sizes:
            batches = [[(image, False) for image in images[i:i + size]] for i in range(0, len(images), size)]
            api.predict(batches[0])  # warm-up: arenas, kernels
            passes = []
            for _ in range(repeats):
                cpu = time.process_time()
                for batch in batches:
                    api.predict(batch)
                passes.append((time.process_time() - cpu) * 1000 / len(images))
            by_batch[size] = round(statistics.median(passes), 2)
        best = min(by_batch, key=by_batch.get)
        out[frames] = {"ms_per_frame": by_batch[best], "batch": best, "by_batch": by_batch}
        progress(f"  models alone, {frames}: {by_batch[best]} ms of CPU per frame at batch {best} "
                 f"({', '.join(f'{k}: {v}' for k, v in by_batch.items())})")
    return out
