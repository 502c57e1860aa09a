#!/usr/bin/env bash
# emanet study heads: the equivalent commands, one run and one evaluation each
set -euo pipefail

# the study itself (run again to continue an interrupted study):
emanet study heads --config synthetic_toy --out docs/study/heads --no-progress

# reference: model.head_layout=reference model.aux=false
emanet train --config synthetic_toy model.head_layout=reference model.aux=false train.out_dir=docs/study/heads/runs/reference --resume
emanet eval docs/study/heads/runs/reference --out docs/study/heads/evals/reference.json

# reference_aux: model.head_layout=reference model.aux=true
emanet train --config synthetic_toy model.head_layout=reference model.aux=true train.out_dir=docs/study/heads/runs/reference_aux --resume
emanet eval docs/study/heads/runs/reference_aux --out docs/study/heads/evals/reference_aux.json

# mmseg: model.head_layout=mmseg model.aux=false
emanet train --config synthetic_toy model.head_layout=mmseg model.aux=false train.out_dir=docs/study/heads/runs/mmseg --resume
emanet eval docs/study/heads/runs/mmseg --out docs/study/heads/evals/mmseg.json

# mmseg_aux: model.head_layout=mmseg model.aux=true
emanet train --config synthetic_toy model.head_layout=mmseg model.aux=true train.out_dir=docs/study/heads/runs/mmseg_aux --resume
emanet eval docs/study/heads/runs/mmseg_aux --out docs/study/heads/evals/mmseg_aux.json
