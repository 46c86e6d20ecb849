"""From an exam to model inputs: slice matching, resampling onto the T1 grid, the input contract."""
