"""Models of a run: built from a registry name and keyword arguments, sized for the data and proved to
run at its input size (:mod:`.build`), and rebuilt from a checkpoint for plain timm use (:mod:`.pretrained`,
home of the public :func:`jacplug.load_model`)."""
