"""mp4 output that grows as blocks are decoded and appears at its final name only when finalised.

Frames go to ffmpeg (the binary shipped in the ``imageio-ffmpeg`` wheel) through a pipe as soon as they exist, so
nothing waits for the end of the stream. The file is written as ``<name>.part`` and renamed on :meth:`close`;
``close`` is also what an interrupt calls, so an interrupted run still leaves a playable mp4 of every frame
decoded so far. ffmpeg runs in its own process group, so a Ctrl-C reaches us, not it.
"""

from __future__ import annotations

import os

import numpy as np


class Mp4Writer:
    def __init__(self, path: str, height: int, width: int, fps: int = 16):
        import imageio_ffmpeg

        self.path = path
        self.tmp_path = path + ".part"
        self.frames = 0
        self._writer = imageio_ffmpeg.write_frames(
            self.tmp_path,
            size=(width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            output_params=["-f", "mp4"],
            ffmpeg_log_level="error",
        )
        self._writer.send(None)  # start ffmpeg

    def append(self, frames: np.ndarray) -> None:
        """``frames``: ``[T, H, W, 3]`` uint8."""
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
            self.frames += 1

    def close(self) -> str | None:
        """Finalise and move into place; returns the path, or ``None`` if no frame was written."""
        if self._writer is None:
            return self.path if os.path.exists(self.path) else None
        writer, self._writer = self._writer, None
        writer.close()
        if self.frames == 0:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)
            return None
        os.replace(self.tmp_path, self.path)
        return self.path


def read_video_info(path: str) -> tuple[int, int, int]:
    """``(frames, height, width)`` of a video file, by decoding it (used by tests and the run report)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    meta = reader.__next__()
    width, height = meta["size"]
    count = sum(1 for _ in reader)
    return count, height, width
