// A DOM for React under Node: jsdom's window as the globals Testing Library and react-dom use.
// Imported first by the hook tests (ES imports run in order). fetch stays Node's own.
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", { url: "http://localhost/" });
const { window } = dom;
for (const name of ["window", "document", "navigator", "HTMLElement", "Node", "Event", "MouseEvent", "getComputedStyle"]) {
  Object.defineProperty(globalThis, name, {
    configurable: true,
    writable: true,
    value: name === "window" ? window : typeof window[name] === "function" && name === "getComputedStyle" ? window[name].bind(window) : window[name],
  });
}
// Updates that arrive from the network (outside act) are expected here: no act() warnings for them.
globalThis.IS_REACT_ACT_ENVIRONMENT = false;
