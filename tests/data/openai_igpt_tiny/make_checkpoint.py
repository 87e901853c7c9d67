"""Writes the real TensorFlow checkpoint next to this file, for tests/test_convert_igpt.py.

It is written by TensorFlow itself (TF1 graph mode, as openai/image-gpt trained): variables
named as in openai/image-gpt src/model.py, one Adam step with a zero gradient (so the slots
`.../Adam`, `.../Adam_1`, `beta1_power`, `beta2_power` and `global_step` are there as in a
training checkpoint while the weights stay exact), saved by a sharded Saver over 3 CPU devices
(4 data shards and a merged index, like the released 32- and 64-shard checkpoints). A second,
one-shard checkpoint `dtypes/model.ckpt-1` holds tensors of other dtypes. The weights follow a
closed formula (`weights()`), so the test knows them without TensorFlow. Regenerate with

  pip install tensorflow-cpu   # in a throwaway virtualenv; pixelgen never needs TensorFlow
  python tests/data/openai_igpt_tiny/make_checkpoint.py
"""

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS, WIDTH, HEADS, COLOURS, SIDE = 2, 16, 2, 8, 3
DTYPE_VALUES = {'extra/f16': np.arange(6, dtype=np.float16).reshape(2, 3) / 4,
                'extra/i64': np.int64(-7), 'extra/bool': np.array([True, False, True]),
                'extra/f64': np.linspace(-1, 1, 5)}


def weights() -> dict[str, np.ndarray]:
    """{openai/image-gpt variable name: float32 value}, from a closed formula."""
    e = WIDTH // HEADS
    shapes = {'model/wte': (COLOURS, WIDTH), 'model/wpe': (SIDE * SIDE, WIDTH),
              'model/sos': (WIDTH,), 'model/wtet': (COLOURS, WIDTH), 'model/ln_f/g': (WIDTH,)}
    for i in range(LAYERS):
        p = f'model/h{i}/'
        shapes.update({p + 'ln_1/g': (WIDTH,), p + 'ln_2/g': (WIDTH,),
                       p + 'mlp/c_fc/w': (WIDTH, 4 * WIDTH),
                       p + 'mlp/c_proj/w': (4 * WIDTH, WIDTH)})
        shapes.update({p + f'attn/{c}_proj': (HEADS, e, WIDTH) for c in 'qkvc'})
    out = {}
    for k, (name, shape) in enumerate(sorted(shapes.items())):
        wave = np.sin(1.0 + k + 0.7 * np.arange(np.prod(shape))).reshape(shape)
        out[name] = (1.0 + 0.3 * wave if name.endswith('/g') else 0.5 * wave).astype(np.float32)
    return out


def main() -> None:
    import tensorflow as tf
    tf1 = tf.compat.v1
    tf1.disable_eager_execution()
    values = weights()
    for i, name in enumerate(sorted(values)):
        with tf.device(f'/cpu:{i % 3}'):
            tf1.get_variable(name, initializer=tf.constant(values[name]))
    step = tf1.train.get_or_create_global_step()
    zero = tf.add_n([tf.reduce_sum(v) * 0.0 for v in tf1.trainable_variables()])
    train = tf1.train.AdamOptimizer(1e-3).minimize(zero, global_step=step)
    model_vars = tf1.global_variables()
    extra = [tf1.get_variable(name, initializer=tf.constant(value), trainable=False)
             for name, value in DTYPE_VALUES.items()]
    with tf1.Session(config=tf1.ConfigProto(device_count={'CPU': 3})) as sess:
        sess.run(tf1.global_variables_initializer())
        sess.run(train)
        tf1.train.Saver(model_vars, sharded=True).save(
            sess, os.path.join(HERE, 'model.ckpt'), global_step=1000, write_meta_graph=False)
        os.makedirs(os.path.join(HERE, 'dtypes'), exist_ok=True)
        tf1.train.Saver(extra).save(sess, os.path.join(HERE, 'dtypes', 'model.ckpt'),
                                    global_step=1, write_meta_graph=False)
    for folder in (HERE, os.path.join(HERE, 'dtypes')):
        os.remove(os.path.join(folder, 'checkpoint'))  # TF's pointer file, with absolute paths
    np.save(os.path.join(HERE, 'kmeans_centers.npy'),
            np.linspace(-1, 1, COLOURS * 3).reshape(COLOURS, 3).astype(np.float32))


if __name__ == '__main__':
    main()
