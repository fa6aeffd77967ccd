"""The RubikSSL module's parts, each owning one concern (the module file RubikSSL.py wires them to the panel).

jobcontrol: the job state machine (plain Python); nodeio: scene nodes <-> the files a worker reads; results: the
files a worker wrote -> scene nodes; install: the dependencies; interactivepanel: click-guided segmentation with
markups and the `serve` worker. Only jobcontrol and the pure helpers of the others run without Slicer (tested).
"""
