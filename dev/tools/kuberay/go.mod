// Pins the KubeRay release whose CRDs (RayJob, RayCluster) the dev cluster installs.
// Nothing is built from it: the CRD YAMLs are copied out of the downloaded module.
module finetune.dev/tools/kuberay

go 1.25.0

require github.com/ray-project/kuberay/ray-operator v1.5.1
