"""The "Models" section of the module's GUI: a table and buttons over ``UADExtensionLib.models``.

Qt is imported inside the methods (this file is only used inside Slicer).  All the work
(verify, import, authors' checkpoints, LPIPS backbone, remove, folder) is in ``models``, which is tested with pytest.
"""

from __future__ import annotations

from . import models

COLUMNS = ["ID", "Methods", "Contrast", "Resolution", "Threshold", "Location", "Status"]


class ModelsPanel:
    """Binds the .ui's models widgets; ``onChanged()`` is called after the list changed."""

    def __init__(self, ui, errorDisplay, onChanged=None):
        self.ui = ui
        self.errorDisplay = errorDisplay  # slicer.util.tryWithErrorDisplay
        self.onChanged = onChanged or (lambda: None)
        table = ui.modelsTableWidget
        table.setColumnCount(len(COLUMNS))
        table.setHorizontalHeaderLabels(COLUMNS)
        table.horizontalHeader().setStretchLastSection(True)
        ui.modelsRefreshButton.connect("clicked(bool)", self.refresh)
        ui.modelsVerifyButton.connect("clicked(bool)", self.onVerify)
        ui.modelsImportButton.connect("clicked(bool)", self.onImport)
        ui.modelsImportReferenceButton.connect("clicked(bool)", self.onImportReference)
        ui.lpipsImportButton.connect("clicked(bool)", self.onImportLPIPS)
        ui.modelsRemoveButton.connect("clicked(bool)", self.onRemove)
        ui.modelsOpenFolderButton.connect("clicked(bool)", self.onOpenFolder)
        self.refresh()

    def refresh(self) -> None:
        import qt

        try:
            rows = models.list_rows()
        except Exception as e:
            self.ui.modelsStatusLabel.text = f"Cannot list models: {e}"
            return
        table = self.ui.modelsTableWidget
        table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, text in enumerate((r.id, r.methodsText, r.contrast, r.resolution, r.threshold, r.location, r.status)):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(r.description)
                table.setItem(i, j, item)
        table.resizeColumnsToContents()
        from uad.zoo import user_models_dir

        self.ui.modelsStatusLabel.text = f"{len(rows)} model(s); user folder: {user_models_dir()}"
        self.onChanged()

    def selectedId(self):
        row = self.ui.modelsTableWidget.currentRow()
        item = self.ui.modelsTableWidget.item(row, 0) if row >= 0 else None
        return item.text() if item is not None else None

    def _do(self, what: str, action) -> None:
        with self.errorDisplay(f"{what} failed.", waitCursor=True):
            message = action()
            self.refresh()
            self.ui.modelsStatusLabel.text = message

    def onVerify(self) -> None:
        model_id = self.selectedId()
        if model_id:
            self._do("Verification", lambda: f"{model_id}: checksum and weights OK "
                                              f"(sha256 {models.verify_model(model_id)[:16]}...).")

    def onImport(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(None, "Import model", "", "Model (*.safetensors *.json);;All files (*)")
        if path:
            self._do("Import", lambda: "Imported: " + ", ".join(models.import_model_file(path)))

    def onImportReference(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(None, "Import the authors' checkpoint", "",
                                              "PyTorch checkpoint (*.pt *.pth);;All files (*)")
        if path:
            self._do("Import", lambda: "Imported: " + models.import_reference_checkpoint(path)
                     + " (use it with its method; see its card)")

    def onImportLPIPS(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(None, "Import LPIPS backbone", "", "PyTorch weights (*.pth);;All files (*)")
        if path:
            self._do("Import", lambda: f"LPIPS backbone installed as {models.import_lpips_backbone(path)}.")

    def onRemove(self) -> None:
        import slicer

        model_id = self.selectedId()
        if model_id and slicer.util.confirmOkCancelDisplay(f"Remove model {model_id} from the user folder?"):
            self._do("Removal", lambda: f"Removed {models.remove_model(model_id)}.")

    def onOpenFolder(self) -> None:
        import qt

        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(models.models_folder())))
