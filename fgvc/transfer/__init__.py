"""Transfer learning: what of a pretrained backbone trains (fgvc.models.backbone's stages; fgvc.build applies
transfer.*), the linear probe's feature cache (features), the weighted k-NN probe of frozen features (knn) and the
rule of thumb, measured (advise; `python -m fgvc.transfer advise`)."""
