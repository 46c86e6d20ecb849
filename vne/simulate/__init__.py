# simulator
