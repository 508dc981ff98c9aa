// Stub of <MetalPerformanceShaders/MetalPerformanceShaders.h>: what ATen/mps/MPSStream.h names (see README.md).
#pragma once
#import <Metal/Metal.h>

// https://developer.apple.com/documentation/metalperformanceshaders/mpscommandbuffer
@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@property(readonly, retain, nonnull) id<MTLCommandBuffer> commandBuffer;
@end
