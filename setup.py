"""seqdec: fast sequence decoding in JAX / Flax NNX."""

import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent


def requirements(name):
  lines = (here / name).read_text().splitlines()
  return [ln.split("#")[0].strip() for ln in lines
          if ln.split("#")[0].strip()]


setup(
    name="seqdec",
    version="0.1.0",
    description="Fast sequence decoding (speculative, tree, SSM) in JAX/Flax NNX",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ and launch/ are files run by path, not packages.
    packages=find_packages(include=["seqdec", "seqdec.*"]),
    # Trained drafters shipped for installed models (checkpoints/drafters.py).
    package_data={"seqdec.parallel": ["scan_table.json"],
                  "seqdec.kernels": ["cpu/*.cc"],
                  "seqdec.checkpoints": ["shipped/*/*.json",
                                         "shipped/*/*.safetensors",
                                         "shipped/*/*.npz"]},
    install_requires=requirements("requirements.txt"),
    extras_require={
        "test": requirements("requirements-dev.txt"),
        # Install torch first (pinned CPU wheel): see requirements-oracle.txt.
        "oracle": requirements("requirements-oracle.txt"),
    },
)
