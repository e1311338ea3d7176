"""Applications built on the library: the demo main job, the benchmarks and the embed job.

The library (everything else under ``volumes``) never imports from here.
"""
