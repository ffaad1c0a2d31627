"""``python -m dqrm_lightning.data.synthetic demo 200000 out/ --seed 0``: write a synthetic dataset."""

from dqrm_lightning.data.synthetic.generate import main

main()
