"""What a training run costs, predicted before it runs (`lmtune estimate`): the model's shape and the run's
micro-batches (`shape`), this machine's measured rates (`machine`) and the memory/time formulas (`formulas`)."""
