// Stub of <MetalPerformanceShadersGraph/MetalPerformanceShadersGraph.h>: what ATen/mps/MPSStream.h names
// (see README.md).
#pragma once
#import <MetalPerformanceShaders/MetalPerformanceShaders.h>

// https://developer.apple.com/documentation/metalperformanceshadersgraph
@interface MPSGraph : NSObject
@end
@interface MPSGraphExecutionDescriptor : NSObject
@end
@interface MPSGraphCompilationDescriptor : NSObject
@end
