"""Image GPT at the paper's sizes (Chen et al. 2020, "Generative Pretraining from Pixels").

  python -m pixelgen.train --config configs/igpt.py:s --workdir W        # iGPT-S, 32x32
  python -m pixelgen.train --config configs/igpt.py:l,res=48 --workdir W # iGPT-L, 48x48
  python -m pixelgen.train --config configs/igpt.py:xl --workdir W       # iGPT-XL, 64x64

The arg is `size[,res=N][,dataset=NAME][,objective=ar|bert]`, size `s` by default. Sizes (P2 §3.3):
  s   24 layers,  512 wide,  8 heads    76M parameters   32x32
  m   36 layers, 1024 wide,  8 heads   455M              32x32
  l   48 layers, 1536 wide, 16 heads  1362M              32x32 (48x48 also trained)
  xl  60 layers, 3072 wide, 24 heads  6801M              64x64
XL's head count is not stated in the paper; we use 24 (head_dim 128, as L's 96 rounded up
to the TPU-friendly 128). Batch 128 (XL 64), Adam β2 = 0.95, one epoch of linear warm-up
then cosine decay to 0, no weight decay, no dropout, fp32 (paper §3.4). The learning rates
are the ones reported for the released runs (S 3e-3, M 1e-3, L 1e-3, XL 3e-4); tune them.
The dataset must be prepared in array_record format in `data.data_dir` (see README).

Datasets (tfds catalog names) and their splits, validation held out as in the paper (P2 §3.1):
  imagenet2012   train = train[:96%], validation = train[96%:], test = validation (the
                 official labelled evaluation split; ImageNet's own test split has no labels)
  cifar10, cifar100, stl10   train = train[:90%], validation = train[90%:], test = test
`data.eval_split` (evaluated during training) is the validation split; `data.test_split` is
the official test split (`python -m pixelgen.evaluate ... --option split=test`).
Resolutions: 32, 48 or 64 (res=), always with the 512-colour palette.
"""

from pixelgen.config import parse_arg
from pixelgen.tasks import defaults
from pixelgen.tasks.igpt import base_config

SIZES = {  # layers, width, heads, image side, batch, learning rate, steps
    's': (24, 512, 8, 32, 128, 3e-3, 1_000_000),
    'm': (36, 1024, 8, 32, 128, 1e-3, 1_000_000),
    'l': (48, 1536, 16, 32, 128, 1e-3, 1_000_000),
    'xl': (60, 3072, 24, 64, 64, 3e-4, 2_000_000),
}
# tfds name -> (train, validation, test) split, and the size of the train split's share.
DATASETS = {
    'imagenet2012': ('train[:96%]', 'train[96%:]', 'validation', 1_229_920),
    'cifar10': ('train[:90%]', 'train[90%:]', 'test', 45_000),
    'cifar100': ('train[:90%]', 'train[90%:]', 'test', 45_000),
    'stl10': ('train[:90%]', 'train[90%:]', 'test', 4_500),
}
RESOLUTIONS = (32, 48, 64)
OBJECTIVES = ('ar', 'bert')


def get_config(arg=None):
    # res=0: the size's own side.
    a = parse_arg(arg, size=tuple(SIZES), res=0, dataset=tuple(DATASETS), objective=OBJECTIVES)
    if a.res and a.res not in RESOLUTIONS:
        raise ValueError(f'res={a.res} in {arg!r}: the paper trains at {RESOLUTIONS}.')
    layers, width, heads, side, batch, lr, steps = SIZES[a.size]
    train_split, validation_split, test_split, train_size = DATASETS[a.dataset]
    c = base_config()
    c.objective = a.objective
    c.total_steps = steps
    c.batch_size = batch
    c.checkpoint_every_steps = 5000
    c.log_every_steps = 100
    c.eval_every_steps = 10000
    c.eval_examples = 10000
    c.sample_every_steps = 50000
    c.mesh = defaults.FULLY_SHARDED

    c.data.dataset = a.dataset
    c.data.train_split = train_split
    c.data.eval_split = validation_split
    c.data.test_split = test_split
    c.data.image_size = a.res or side
    c.data.palette_size = 512
    c.data.palette_fit_images = 20000
    c.data.palette_fit_pixels_per_image = 16
    c.data.num_threads = 16
    c.data.prefetch = 8

    c.model.num_layers = layers
    c.model.width = width
    c.model.num_heads = heads
    # 'auto': splash on TPU, cuDNN on GPU (bfloat16 dense layers), block_sparse elsewhere.
    c.model.attention = 'auto'
    # Per device at the README's meshes: M needs 68 GiB without remat, 5.1 GiB with 'full'.
    c.model.remat = 'none' if a.size == 's' else 'full'
    # Layers' parameters stacked on a leading axis and scanned over: one layer is compiled,
    # whatever the depth. False: the looped layout (blocks/<i>/...) of converted weights.
    c.model.scan_layers = True

    c.optimizer.learning_rate = lr
    c.optimizer.warmup_steps = train_size // batch   # one epoch
    return c
