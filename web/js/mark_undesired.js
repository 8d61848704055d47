// "Mark as undesired" on images shown by output and preview nodes: adds the image to a named
// forget set through the pack's route, the same store the Mark Undesired Output node loads.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const SETTING = "InstanceUnlearn.DefaultForgetSet";
const TITLE = "Mark as undesired";

// Where the user right-clicked last, in page pixels: Nodes 2.0 draws a node's images as DOM
// elements (a batch as a grid of them, with node.imgs left empty), so the image under the
// pointer is found there; the classic canvas is asked in canvas coordinates (shownImage).
let pointer = null;
document.addEventListener("contextmenu", (event) => { pointer = { x: event.clientX, y: event.clientY }; }, true);

function viewParams(src) {
  const params = new URL(src, window.location.href).searchParams;
  const filename = params.get("filename");
  if (!filename) return null;
  return { filename, subfolder: params.get("subfolder") ?? "", type: params.get("type") ?? "output" };
}

// Nodes 2.0: the image element of this node under the last right-click (its <img> does not take
// pointer events, so the test is geometric).
function imageUnderPointer(node) {
  if (!pointer) return null;
  const element = document.querySelector(`[data-node-id="${node.id}"]`);
  if (!element) return null;
  const hit = [...element.querySelectorAll("img")].find((img) => {
    const r = img.getBoundingClientRect();
    return pointer.x >= r.left && pointer.x <= r.right && pointer.y >= r.top && pointer.y <= r.bottom;
  });
  return hit?.src ? viewParams(hit.src) : null;
}

// Classic canvas: the grid cell under the right-click, from the cells as last drawn
// (node.imageRects, relative to the node) and the canvas's pointer position. The frontend's own
// node.overIndex is updated only when the canvas redraws, so on a right-click that follows a jump
// of the pointer (after a dialog, say) it still names the cell hovered before.
function cellUnderPointer(node) {
  const [x, y] = app.canvas?.graph_mouse ?? [];
  if (x == null || y == null) return null;
  const px = x - node.pos[0];
  const py = y - node.pos[1];
  const index = (node.imageRects ?? []).findIndex(
    ([left, top, width, height]) => px > left && px < left + width && py > top && py < top + height,
  );
  return index < 0 ? null : index;
}

// Classic canvas: the image shown alone (one image, or the one clicked into view), or the grid
// cell under the pointer. A grid with no cell under the pointer marks nothing.
function shownImage(node) {
  const images = node.imgs ?? [];
  if (!images.length) return null;
  const index = images.length === 1 ? 0 : node.imageIndex ?? cellUnderPointer(node);
  const element = index == null ? null : images[Math.min(index, images.length - 1)];
  return element?.src ? viewParams(element.src) : null;
}

function imageToMark(node) {
  const vueNodes = app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled");
  return vueNodes ? imageUnderPointer(node) : shownImage(node);
}

async function askForgetSet() {
  const suggested = app.extensionManager.setting.get(SETTING) || "default";
  const answer = await app.extensionManager.dialog.prompt({
    title: TITLE,
    message: "Forget set to add this image to:",
    defaultValue: suggested,
  });
  return answer?.trim() || null;
}

function notify(severity, detail) {
  app.extensionManager.toast.add({ severity, summary: TITLE, detail, life: severity === "error" ? 8000 : 4000 });
}

async function mark(image) {
  const forgetSet = await askForgetSet();
  if (!forgetSet) return;
  let response;
  let result;
  try {
    response = await api.fetchApi("/unlearn/mark", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ forget_set: forgetSet, ...image }),
    });
    result = await response.json();
  } catch (error) {
    notify("error", `The server did not answer: ${error.message ?? error}`);
    return;
  }
  if (!response.ok) {
    notify("error", result?.error ?? `HTTP ${response.status}`);
    return;
  }
  notify(
    "success",
    result.added
      ? `Added to forget set "${result.forget_set}" (${result.count} targets).`
      : `Already in forget set "${result.forget_set}" (${result.count} targets).`,
  );
}

function menuItems(node) {
  const image = imageToMark(node);
  return image ? [null, { content: TITLE, callback: () => mark(image) }] : [];
}

// Frontends before the node-menu hook (getNodeMenuItems; ComfyUI 0.3.x ships 1.27) have only
// LiteGraph's per-node-type getExtraMenuOptions: the entry goes there instead, and the console
// says so once.
const HAS_NODE_MENU_HOOK = typeof app.collectNodeMenuItems === "function";

app.registerExtension({
  name: "unlearn.MarkUndesired",
  settings: [
    {
      id: SETTING,
      name: "Default forget set for 'Mark as undesired'",
      category: ["Instance Unlearn", "Forget sets", "Default forget set"],
      type: "text",
      defaultValue: "default",
      tooltip: "The forget set the image context menu suggests; the Mark Undesired Output node loads it by name.",
    },
  ],
  ...(HAS_NODE_MENU_HOOK
    ? { getNodeMenuItems: menuItems }
    : {
        setup() {
          console.warn(
            `[instance_unlearn] this frontend (${window.__COMFYUI_FRONTEND_VERSION__ ?? "unknown version"}) has no ` +
              "getNodeMenuItems hook: 'Mark as undesired' is added to the legacy node menu (classic renderer).",
          );
        },
        beforeRegisterNodeDef(nodeType) {
          const original = nodeType.prototype.getExtraMenuOptions;
          nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
            const result = original?.apply(this, arguments);
            options.push(...menuItems(this));
            return result;
          };
        },
      }),
});
