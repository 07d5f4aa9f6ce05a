"""Running a model: jit-compiled generation, sampling, streamed text, multi-process jobs."""
