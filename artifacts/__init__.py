"""Model artifacts: `python -m artifacts.build` writes `<dir>/model.pt` + `<dir>/manifest.json`.

Kept import-light (no torch here); the built artifacts live in subfolders, which git ignores.
"""
