from .kcenter import KCenterTokenSampler, kcenter_sample
from .vit import KCenterViT, build_model, load_pretrained_2d
