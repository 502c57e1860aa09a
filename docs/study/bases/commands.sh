#!/usr/bin/env bash
# emanet study bases: the equivalent commands, one run and one evaluation each
set -euo pipefail

# the study itself (run again to continue an interrupted study):
emanet study bases --config synthetic_toy --out docs/study/bases --no-progress

# ema: model.bases_update=ema model.renormalize=false model.differentiable=false
emanet train --config synthetic_toy model.bases_update=ema model.renormalize=false model.differentiable=false train.out_dir=docs/study/bases/runs/ema --resume
emanet eval docs/study/bases/runs/ema --out docs/study/bases/evals/ema.json

# ema_l2: model.bases_update=ema model.renormalize=true model.differentiable=false
emanet train --config synthetic_toy model.bases_update=ema model.renormalize=true model.differentiable=false train.out_dir=docs/study/bases/runs/ema_l2 --resume
emanet eval docs/study/bases/runs/ema_l2 --out docs/study/bases/evals/ema_l2.json

# learned: model.bases_update=learned model.renormalize=false model.differentiable=false
emanet train --config synthetic_toy model.bases_update=learned model.renormalize=false model.differentiable=false train.out_dir=docs/study/bases/runs/learned --resume
emanet eval docs/study/bases/runs/learned --out docs/study/bases/evals/learned.json

# none: model.bases_update=none model.renormalize=false model.differentiable=false
emanet train --config synthetic_toy model.bases_update=none model.renormalize=false model.differentiable=false train.out_dir=docs/study/bases/runs/none --resume
emanet eval docs/study/bases/runs/none --out docs/study/bases/evals/none.json

# ema_grad_all: model.bases_update=ema model.renormalize=false model.differentiable=true
emanet train --config synthetic_toy model.bases_update=ema model.renormalize=false model.differentiable=true train.out_dir=docs/study/bases/runs/ema_grad_all --resume
emanet eval docs/study/bases/runs/ema_grad_all --out docs/study/bases/evals/ema_grad_all.json

# ema_grad_last: model.bases_update=ema model.renormalize=false model.differentiable=last
emanet train --config synthetic_toy model.bases_update=ema model.renormalize=false model.differentiable=last train.out_dir=docs/study/bases/runs/ema_grad_last --resume
emanet eval docs/study/bases/runs/ema_grad_last --out docs/study/bases/evals/ema_grad_last.json
