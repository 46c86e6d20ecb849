"""Gadgetron entry points of VNE (thin: the data path lives in :mod:`vne.runtime.pipeline`).

``gadgets.vne_gadget.gadget`` is the target of the pipeline XMLs in ``pipelines_xml/``::

    <external>
      <execute name="gadgets.vne_gadget" target="gadget" type="python"/>
      <configuration> <property name="model" value="..."/> ... </configuration>
    </external>
"""
