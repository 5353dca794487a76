"""A miniature world of captioned pictures, so the project can train and test tiny *real* models
(a VAE + UNet, a CLIP, a GPT-2 policy) on machines that cannot download weights.

* `rules`     -- the world's vocabulary: shapes, colours, sizes, relations, style axes and values;
* `scenes`    -- `Scene` (content + style), a seeded sampler, and `render(scene) -> (32, 32, 3) uint8`
                 (pixel primitives in `draw`);
* `captions`  -- plain and engineered captions, modifier phrasings, and their parsers;
* `reader`    -- measures a picture's attributes from pixels alone (a small shipped CNN; trained and
                 measured by `reader_train`);
* `taste`     -- the hidden aesthetic over what the reader sees, with named modes;
* `corpus`    -- the "human-engineered" SFT pairs and the plain prompt lists;
* `grid`      -- `python -m world.grid` draws docs/world/scenes.png;
* `models`    -- the trained models' architectures (AutoencoderKL, CLIPModel, UNet2DConditionModel) and
                 where their weights ship (world/assets/sd, clip, aesthetic.safetensors);
* `data`      -- training captions: the content always, each style axis only sometimes;
* `build`     -- `python -m world.build` trains them all from seeds (`sight` retrains the CLIP's image tower
                 to see style; `training` holds what the stages share); `weights` saves, loads, records.

The rules are written out in world/README.md. Nothing here imports above `common`.
"""
