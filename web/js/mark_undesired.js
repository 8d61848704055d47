// "Mark as undesired" on images shown by output and preview nodes: adds the image to a named
// forget set through the pack's route, the same store the Mark Undesired Output node loads.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SETTING = "InstanceUnlearn.DefaultForgetSet";

function shownImage(node) {
  const images = node.imgs ?? [];
  if (!images.length) return null;
  const index = node.imageIndex ?? node.overIndex ?? 0;
  const element = images[Math.min(index, images.length - 1)];
  if (!element?.src) return null;
  const params = new URL(element.src, window.location.href).searchParams;
  const filename = params.get("filename");
  if (!filename) return null;
  return { filename, subfolder: params.get("subfolder") ?? "", type: params.get("type") ?? "output" };
}

async function mark(image) {
  const fallback = app.extensionManager?.setting?.get(SETTING) ?? "default";
  const forgetSet = window.prompt("Forget set to add this image to:", fallback);
  if (!forgetSet) return;
  const response = await api.fetchApi("/unlearn/mark", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ forget_set: forgetSet.trim(), ...image }),
  });
  const result = await response.json();
  const toast = app.extensionManager?.toast;
  if (!response.ok) {
    toast?.add({ severity: "error", summary: "Mark as undesired", detail: result.error, life: 6000 });
    return;
  }
  const detail = result.added
    ? `Added to forget set "${result.forget_set}" (${result.count} targets).`
    : `Already in forget set "${result.forget_set}".`;
  toast?.add({ severity: "success", summary: "Mark as undesired", detail, life: 4000 });
}

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
  getNodeMenuItems(node) {
    const image = shownImage(node);
    if (!image) return [];
    return [null, { content: "Mark as undesired", callback: () => mark(image) }];
  },
});
