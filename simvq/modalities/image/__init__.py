"""The image modality: Open-MAGVIT2-style CNN tokenizer, image data sets, PSNR/SSIM/LPIPS/rFID, PNG files."""

from __future__ import annotations

from pathlib import Path

from simvq.modalities.base import Modality, bits_per_token
from simvq.modalities.image.config import ImageDataConfig, ImageLossConfig, ImageModelConfig, finalize_image_config
from simvq.modalities.image.convert import convert_official_image, is_official_image_state_dict
from simvq.modalities.image.data import ImageFolder, build_image_datasets, list_images
from simvq.modalities.image.files import decode_image_tokens, encode_image_files
from simvq.modalities.image.metrics import ImageMetrics
from simvq.modalities.image.model import build_image_tokenizer
from simvq.modalities.image.task import ImageTask

#: built-in data sets a ``--data`` argument may name (the ``data.dataset`` values other than ``folder``)
BUILTIN_DATASETS = ("photos", "fashion_mnist", "digits")


class ImageModality(Modality):
    name = "image"
    task_class = ImageTask
    token_grid = True

    def sections(self) -> dict:
        return {"model": ImageModelConfig, "loss": ImageLossConfig, "data": ImageDataConfig}

    def finalize_config(self, config: dict) -> dict:
        return finalize_image_config(config)

    def code_dim(self, config: dict) -> int:
        return int(config["model"]["z_channels"])

    def build_model(self, config: dict):
        return build_image_tokenizer(config["model"], config["quantizer"])

    def build_datasets(self, config: dict):
        return build_image_datasets(config["data"], seed=config.get("seed", 0))

    def data_changes(self, text: str) -> dict:
        if text in BUILTIN_DATASETS:
            return {"dataset": text}
        return {"dataset": "folder", "path": text, "eval_path": text}

    def eval_dataset(self, config: dict, data):
        if data is None:
            return self.build_datasets(config)[1], f"{config['data'].get('dataset')} (evaluation split)"
        d = config["data"]
        if d.get("dataset") == "folder" and d.get("eval_path"):
            # a folder of images: evaluate every file (centre crops at the model's training size)
            files = list_images(d["eval_path"])
            if d.get("eval_limit") is not None:
                files = files[: d["eval_limit"]]
            ds = ImageFolder(files, size=d["image_size"], channels=d["channels"], verify=d["verify_images"],
                             name=str(d["eval_path"]))
            return ds, f"folder {d['eval_path']}"
        return self.build_datasets(config)[1], f"{d.get('dataset')} (evaluation split)"

    def build_metrics(self, config: dict, device):
        return ImageMetrics(device=device)

    def rate(self, model, config: dict) -> dict:
        side = int(config["data"]["image_size"]) // int(model.downsample_factor)
        tokens = side * side
        bits = bits_per_token(model.quantize)
        return {"tokens_per_image": tokens, "bits_per_token": bits, "bits_per_image": tokens * bits}

    def encode_files(self, tok, config: dict, inputs: list[str], out: Path, *, size: int | None, device) -> str:
        return encode_image_files(tok, config, inputs, out, size=size)

    def decode_files(self, tok, config: dict, tokens, out: Path, *, overwrite: bool, device) -> str:
        return decode_image_tokens(tok, tokens, out, overwrite=overwrite)

    def is_official(self, state_dict) -> bool:
        return is_official_image_state_dict(state_dict)

    def convert_official(self, state_dict, use_ema: bool):
        return convert_official_image(state_dict, use_ema)

    def compare(self):
        from simvq.modalities.image import compare

        return compare


MODALITY = ImageModality()

__all__ = ["BUILTIN_DATASETS", "ImageModality", "MODALITY"]
