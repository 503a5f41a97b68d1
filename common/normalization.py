"""Pixel normalisation shared by every data backend, the TensorBoard image grid and the tests (ImageNet statistics:
the pretrained backbones expect them)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
