from .kcenter import KCenterTokenSampler, kcenter_sample
from .motionformer import KCenterMotionformer
from .timesformer import KCenterTimeSformer
from .vit import KCenterViT, build_model, load_pretrained_2d

# model.arch -> family: the one place a name is looked up (build_model)
ARCHS = {"vit": KCenterViT, "timesformer": KCenterTimeSformer, "motionformer": KCenterMotionformer}
