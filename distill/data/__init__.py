"""Data: manifest, video IO, the synthetic world, preparation into shards, datasets and streams.

manifest.py (JSONL records) → shots.py (decoded clips, via video.py) → prepare.py (codec + text
encoder → shards.py) → datasets.py (samples) → stream.py (resumable per-rank batches).
world.py/synth.py render the synthetic sprite world; components.py builds all of it from a recipe.
"""
