"""Datasets: what a dataset plugin returns (:class:`~jacplug.data.datasets.DatasetSplits`), the built-in
datasets (the embedded digits, CIFAR, image folders) and few-sample subsets. The embedded digits file
lives in this folder."""
