#!/usr/bin/env bash
# emanet study iterations: the equivalent commands, one run and one evaluation each
set -euo pipefail

# the study itself (run again to continue an interrupted study):
emanet study iterations --config synthetic_toy --out docs/study/iterations --no-progress

# T1: model.num_stages=1
emanet train --config synthetic_toy model.num_stages=1 train.out_dir=docs/study/iterations/runs/T1 --resume
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=1 --out docs/study/iterations/evals/T1_Teval1.json
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=2 --out docs/study/iterations/evals/T1_Teval2.json
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=3 --out docs/study/iterations/evals/T1_Teval3.json
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=4 --out docs/study/iterations/evals/T1_Teval4.json
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=5 --out docs/study/iterations/evals/T1_Teval5.json
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=6 --out docs/study/iterations/evals/T1_Teval6.json
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=7 --out docs/study/iterations/evals/T1_Teval7.json
emanet eval docs/study/iterations/runs/T1 eval.eval_stages=8 --out docs/study/iterations/evals/T1_Teval8.json

# T2: model.num_stages=2
emanet train --config synthetic_toy model.num_stages=2 train.out_dir=docs/study/iterations/runs/T2 --resume
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=1 --out docs/study/iterations/evals/T2_Teval1.json
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=2 --out docs/study/iterations/evals/T2_Teval2.json
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=3 --out docs/study/iterations/evals/T2_Teval3.json
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=4 --out docs/study/iterations/evals/T2_Teval4.json
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=5 --out docs/study/iterations/evals/T2_Teval5.json
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=6 --out docs/study/iterations/evals/T2_Teval6.json
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=7 --out docs/study/iterations/evals/T2_Teval7.json
emanet eval docs/study/iterations/runs/T2 eval.eval_stages=8 --out docs/study/iterations/evals/T2_Teval8.json

# T3: model.num_stages=3
emanet train --config synthetic_toy model.num_stages=3 train.out_dir=docs/study/iterations/runs/T3 --resume
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=1 --out docs/study/iterations/evals/T3_Teval1.json
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=2 --out docs/study/iterations/evals/T3_Teval2.json
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=3 --out docs/study/iterations/evals/T3_Teval3.json
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=4 --out docs/study/iterations/evals/T3_Teval4.json
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=5 --out docs/study/iterations/evals/T3_Teval5.json
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=6 --out docs/study/iterations/evals/T3_Teval6.json
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=7 --out docs/study/iterations/evals/T3_Teval7.json
emanet eval docs/study/iterations/runs/T3 eval.eval_stages=8 --out docs/study/iterations/evals/T3_Teval8.json

# T4: model.num_stages=4
emanet train --config synthetic_toy model.num_stages=4 train.out_dir=docs/study/iterations/runs/T4 --resume
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=1 --out docs/study/iterations/evals/T4_Teval1.json
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=2 --out docs/study/iterations/evals/T4_Teval2.json
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=3 --out docs/study/iterations/evals/T4_Teval3.json
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=4 --out docs/study/iterations/evals/T4_Teval4.json
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=5 --out docs/study/iterations/evals/T4_Teval5.json
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=6 --out docs/study/iterations/evals/T4_Teval6.json
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=7 --out docs/study/iterations/evals/T4_Teval7.json
emanet eval docs/study/iterations/runs/T4 eval.eval_stages=8 --out docs/study/iterations/evals/T4_Teval8.json

# T5: model.num_stages=5
emanet train --config synthetic_toy model.num_stages=5 train.out_dir=docs/study/iterations/runs/T5 --resume
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=1 --out docs/study/iterations/evals/T5_Teval1.json
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=2 --out docs/study/iterations/evals/T5_Teval2.json
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=3 --out docs/study/iterations/evals/T5_Teval3.json
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=4 --out docs/study/iterations/evals/T5_Teval4.json
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=5 --out docs/study/iterations/evals/T5_Teval5.json
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=6 --out docs/study/iterations/evals/T5_Teval6.json
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=7 --out docs/study/iterations/evals/T5_Teval7.json
emanet eval docs/study/iterations/runs/T5 eval.eval_stages=8 --out docs/study/iterations/evals/T5_Teval8.json
