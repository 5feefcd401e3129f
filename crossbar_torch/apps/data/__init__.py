"""Image data for the applications (timm's ``data/`` in spirit): ``imagenet`` (ImageNet-1K
folders, unlabeled image lists, preprocessing, unreadable images) and ``photos`` (a few real
photos bundled with installed packages, for smoke tests). Imports no other ``crossbar_torch``
module but its errors."""
from .imagenet import (IMAGE_EXTENSIONS, Batch, BadImage, ImageList, ImageNetFolder,  # noqa: F401
                       UnreadableImageError, collate_skip_bad, data_config_for,
                       imagenet_class_names, imagenet_synsets, images_in_folder, open_rgb,
                       resolve_split_root, synset_to_index, transform_for)
from .photos import BundledPhoto, BundledPhotos, bundled_photos, photo_correct  # noqa: F401

__all__ = ["IMAGE_EXTENSIONS", "Batch", "BadImage", "ImageList", "ImageNetFolder",
           "UnreadableImageError", "collate_skip_bad", "data_config_for", "imagenet_class_names",
           "imagenet_synsets", "images_in_folder", "open_rgb", "resolve_split_root",
           "synset_to_index", "transform_for", "BundledPhoto", "BundledPhotos", "bundled_photos",
           "photo_correct"]
