"""Landmark Review: walk an lmk3d detection lowest score first, accept or move each point, submit the markups.

The widgets only: every request, the review order, the reviewer's decisions and the markups document
are in ``LandmarkReviewLib/landmark_review.py`` (plain Python, tested against the real server in the
project's ``make test``). This file cannot be tested without 3D Slicer; keep it thin.
"""

from __future__ import annotations

import qt
import slicer
from LandmarkReviewLib.landmark_review import (
    ACCEPTED,
    MOVED,
    NOT_VISIBLE,
    PLACED,
    ReviewSession,
    ServerClient,
)
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

SETTINGS_URL = "LandmarkReview/serverUrl"
DEFAULT_URL = "http://127.0.0.1:8000"
WARNING_COLOR = (1.0, 0.5, 0.0)  # orange: a point to look at (not found, or score < WARN_SCORE)
CONFIDENT_COLOR = (0.2, 0.8, 0.2)  # green
TRAIN_POLL_MS = 2000
COLUMNS = ("Landmark", "Score", "Review")


class LandmarkReview(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Landmark Review"
        self.parent.categories = ["Active Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["lmk3d"]
        self.parent.helpText = (
            "Review landmarks detected by an lmk3d server: the points come lowest score first (points the "
            "detector did not find first of all), each to accept, move, place or mark not visible; Submit "
            "stores the corrected points as the image's final label. See plugins/slicer/README.md.")
        self.parent.acknowledgementText = ""


class LandmarkReviewWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.review: ReviewSession | None = None
        self.volume = None
        self.points = None  # the vtkMRMLMarkupsFiducialNode of the review
        self.index = {}  # landmark name -> control point index in self.points
        self.timer = qt.QTimer()
        self.timer.setInterval(TRAIN_POLL_MS)
        self.timer.connect("timeout()", self.onTrainPoll)

    # --- layout ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.urlEdit = qt.QLineEdit(qt.QSettings().value(SETTINGS_URL, DEFAULT_URL))
        form.addRow("Server:", self.urlEdit)
        self.tokenEdit = qt.QLineEdit()
        self.tokenEdit.echoMode = qt.QLineEdit.Password
        self.tokenEdit.placeholderText = "only if the server has LMK3D_API_TOKEN"
        form.addRow("Token:", self.tokenEdit)
        row = qt.QHBoxLayout()
        self.modelCombo = qt.QComboBox()
        refresh = qt.QPushButton("Connect")
        row.addWidget(self.modelCombo, 1)
        row.addWidget(refresh)
        form.addRow("Model:", row)
        row = qt.QHBoxLayout()
        self.imageEdit = qt.QLineEdit()
        self.imageEdit.placeholderText = "datastore image id"
        nextButton = qt.QPushButton("Next image")
        detectButton = qt.QPushButton("Detect")
        for w in (self.imageEdit, nextButton, detectButton):
            row.addWidget(w)
        form.addRow("Image:", row)

        self.table = qt.QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.table.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.layout.addWidget(self.table)
        row = qt.QHBoxLayout()
        acceptButton = qt.QPushButton("Accept")
        jumpButton = qt.QPushButton("Jump to")
        jumpButton.toolTip = "Centre the views on the point and unlock it; a point not found: place it"
        hideButton = qt.QPushButton("Not visible")
        for w in (acceptButton, jumpButton, hideButton):
            row.addWidget(w)
        self.layout.addLayout(row)
        row = qt.QHBoxLayout()
        submitButton = qt.QPushButton("Submit")
        self.minutesSpin = qt.QDoubleSpinBox()
        self.minutesSpin.setRange(0.1, 1440.0)
        self.minutesSpin.value = 10.0
        self.minutesSpin.suffix = " min"
        trainButton = qt.QPushButton("Train")
        for w in (submitButton, self.minutesSpin, trainButton):
            row.addWidget(w)
        self.layout.addLayout(row)
        self.progress = qt.QProgressBar()
        self.status = qt.QLabel()
        self.status.wordWrap = True
        self.layout.addWidget(self.progress)
        self.layout.addWidget(self.status)
        self.layout.addStretch(1)

        refresh.connect("clicked()", self.onConnect)
        nextButton.connect("clicked()", self.onNextImage)
        detectButton.connect("clicked()", self.onDetect)
        acceptButton.connect("clicked()", self.onAccept)
        jumpButton.connect("clicked()", self.onJump)
        hideButton.connect("clicked()", self.onNotVisible)
        submitButton.connect("clicked()", self.onSubmit)
        trainButton.connect("clicked()", self.onTrain)
        self.table.connect("itemSelectionChanged()", self.onJump)

    def cleanup(self) -> None:
        self.timer.stop()
        self.removeObservers()

    # --- server -------------------------------------------------------------------------------------------
    def client(self) -> ServerClient:
        qt.QSettings().setValue(SETTINGS_URL, self.urlEdit.text)
        return ServerClient(self.urlEdit.text, self.tokenEdit.text)

    def onConnect(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot list the server's models.", waitCursor=True):
            models = self.client().models()
            self.modelCombo.clear()
            self.modelCombo.addItems(models)
            self.status.text = f"{len(models)} model(s) served"

    def onNextImage(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot get the next image.", waitCursor=True):
            answer = self.client().next_image()
            self.imageEdit.text = answer["id"]
            self.volume = None
        self.onDetect()

    def onDetect(self) -> None:
        image, model = self.imageEdit.text.strip(), self.modelCombo.currentText
        if not image or not model:
            slicer.util.errorDisplay("Connect, choose a model and an image (or press Next image) first.")
            return
        with slicer.util.tryWithErrorDisplay(f"Detection on {image} failed.", waitCursor=True):
            client = self.client()
            if self.volume is None or self.volume.GetAttribute("LandmarkReview.image") != image:
                path = client.download_image(image, slicer.app.temporaryPath)
                self.volume = slicer.util.loadVolume(path)
                self.volume.SetAttribute("LandmarkReview.image", image)
            self.review = ReviewSession.from_detection(image, model, client.detect(model, image))
            self.showPoints()
            self.refresh()
        if self.review is not None and self.review.image_warning:
            title = ("Not this model's kind of image" if self.review.image_check.get("in_distribution") is False
                     else "An unusual image for this model")
            slicer.util.warningDisplay(self.review.image_warning, windowTitle=title)

    # --- the points -----------------------------------------------------------------------------------------
    def showPoints(self) -> None:
        """One control point per landmark; warnings unlocked and in the warning colour (as 'selected')."""
        if self.points is not None:
            self.removeObservers()
            slicer.mrmlScene.RemoveNode(self.points)
        review = self.review
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{review.image} {review.model}")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*WARNING_COLOR)
        display.SetColor(*CONFIDENT_COLOR)
        self.index = {}
        for name in review.names:
            p = review.point(name)
            x, y, z = p.ras or (0.0, 0.0, 0.0)
            i = node.AddControlPoint(x, y, z, name)
            if p.ras is None:
                node.UnsetNthControlPointPosition(i)
            node.SetNthControlPointDescription(i, p.score_text())
            node.SetNthControlPointSelected(i, p.warning)
            node.SetNthControlPointLocked(i, not p.warning)
            self.index[name] = i
        node.SetFixedNumberOfControlPoints(True)  # move or place the landmarks, never add others
        self.points = node
        for event in (node.PointEndInteractionEvent, node.PointPositionDefinedEvent):
            self.addObserver(node, event, self.onPointsChanged)

    def positions(self) -> dict:
        """The node's positions (None for an unplaced point), for ReviewSession.sync."""
        out = {}
        for name, i in self.index.items():
            xyz = [0.0, 0.0, 0.0]
            self.points.GetNthControlPointPosition(i, xyz)
            defined = self.points.GetNthControlPointPositionStatus(i) == self.points.PositionDefined
            out[name] = xyz if defined else None
        return out

    def onPointsChanged(self, caller=None, event=None) -> None:
        if self.review is not None and self.points is not None:
            self.review.sync(self.positions())
            self.refresh()

    def refresh(self) -> None:
        review = self.review
        selected = self.current()
        self.table.blockSignals(True)
        self.table.setRowCount(len(review.points))
        for row, p in enumerate(review.points):
            score = f"{p.score:.3f}" if p.found else "not found"
            review_text = p.status + (f" {p.moved_mm():.1f} mm" if p.status == MOVED else "")
            for col, text in enumerate((p.name, score, review_text)):
                item = qt.QTableWidgetItem(text)
                if p.warning:
                    item.setForeground(qt.QBrush(qt.QColor(*(int(255 * c) for c in WARNING_COLOR))))
                self.table.setItem(row, col, item)
            if selected is not None and p.name == selected.name:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        done = len(review.points) - len(review.pending())
        self.status.text = f"{review.image}: {done} of {len(review.points)} reviewed"

    def current(self):
        """The point selected in the table (None when none)."""
        rows = self.table.selectionModel().selectedRows() if self.review is not None else []
        return self.review.points[rows[0].row()] if rows else None

    def selectNext(self) -> None:
        following = self.review.next_pending()
        if following is not None:
            self.table.selectRow(self.review.points.index(following))

    def onAccept(self) -> None:
        p = self.current()
        if p is None:
            return
        with slicer.util.tryWithErrorDisplay("Cannot accept."):
            self.onPointsChanged()
            self.review.accept(p.name)
            self.points.SetNthControlPointLocked(self.index[p.name], True)
            self.refresh()
            self.selectNext()

    def onJump(self) -> None:
        p = self.current()
        if p is None or self.points is None:
            return
        i = self.index[p.name]
        self.points.SetNthControlPointLocked(i, False)
        if self.points.GetNthControlPointPositionStatus(i) == self.points.PositionDefined:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(self.points.GetID(), i, True)
        else:  # not found, or marked not visible: the next click places it
            self.points.SetControlPointPlacementStartIndex(i)
            slicer.modules.markups.logic().SetActiveList(self.points)
            slicer.modules.markups.logic().StartPlaceMode(False)

    def onNotVisible(self) -> None:
        p = self.current()
        if p is None:
            return
        self.review.mark_not_visible(p.name)
        self.points.UnsetNthControlPointPosition(self.index[p.name])
        self.refresh()
        self.selectNext()

    def onSubmit(self) -> None:
        if self.review is None:
            return
        self.onPointsChanged()
        pending = self.review.pending()
        if pending and not slicer.util.confirmOkCancelDisplay(
                f"{len(pending)} point(s) not reviewed ({', '.join(p.name for p in pending)}) will be submitted "
                "where the detector put them. Submit?"):
            return
        with slicer.util.tryWithErrorDisplay("The server refused the label.", waitCursor=True):
            self.review.submit(self.client())
            counts = {s: sum(p.status == s for p in self.review.points) for s in (ACCEPTED, MOVED, PLACED,
                                                                                  NOT_VISIBLE)}
            self.status.text = f"{self.review.image} saved as final: " + ", ".join(
                f"{n} {s}" for s, n in counts.items() if n)

    # --- training -------------------------------------------------------------------------------------------
    def onTrain(self) -> None:
        model = self.modelCombo.currentText
        with slicer.util.tryWithErrorDisplay(f"Cannot start training {model}.", waitCursor=True):
            self.client().start_training(model, {"max_minutes": self.minutesSpin.value})
            self.progress.value = 0
            self.timer.start()

    def onTrainPoll(self) -> None:
        try:
            progress = self.client().training_progress(self.modelCombo.currentText)
        except Exception as e:  # the server may be busy or restarting: say so and keep polling
            self.status.text = f"training: {e}"
            return
        self.progress.value = int(100 * progress.fraction)
        self.status.text = progress.text()
        if not progress.running:
            self.timer.stop()

